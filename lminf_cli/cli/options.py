"""Options shared by several commands, each declared once, and how they become API objects.

`EngineOptions` holds the model, device and every LambdaSettings field a user can set
(None = not given, so the API's defaults and a state's own settings apply);
`SamplingOptions` holds the sampling ones.  `with_options` gives a command the fields
of such a group as its options and hands them to it as one object, so each option's
help and default live here only.  Values are checked by the objects they build
(LambdaSettings, SamplingParams), not here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Optional

import rich.markup
import typer
from typer.core import TyperCommand, TyperGroup

from ..errors import UsageError

# Help panels: the everyday options come first ("Options"), then these groups.
SAMPLING_PANEL = "Sampling"
MODEL_PANEL = "Model placement"
ATTENTION_PANEL = "Λ-attention"
RETRIEVAL_PANEL = "Retrieval (long documents)"


ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="PATH|ID", help=("Local HF directory, .gguf file or cached hub id [default: "
                                                   "$LMINF_MODEL, else the embedded SmolLM2-135M-Instruct]."))]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL_PANEL)]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on GPU and on CPUs with AMX or AVX-512 BF16, else "
                                       "float32), float32, bfloat16, float16.", rich_help_panel=MODEL_PANEL)]
DeviceMapOpt = Annotated[Optional[str], typer.Option(
    "--device-map", metavar="MAP", rich_help_panel=MODEL_PANEL, help=(
        "Spread a model too large for one device with accelerate: auto (balanced, sequential), or an explicit "
        "map as JSON or a .json file, {\"model.layers.0\": 0, ..., \"lm_head\": \"cpu\"}; a module on \"cpu\" "
        "or \"disk\" keeps its weights there and runs on the first GPU. The Λ cache of each layer lives on "
        "its layer's device."))]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", metavar="DEV=SIZE,...", rich_help_panel=MODEL_PANEL, help=(
        "Most memory --device-map may use per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB (what does not fit goes "
        "to disk); implies --device-map auto."))]
LoadInOpt = Annotated[Optional[str], typer.Option(
    "--load-in", metavar="4bit|8bit", rich_help_panel=MODEL_PANEL, help=(
        "Quantize the weights when loading (bitsandbytes, CUDA only: pip install 'lminf[quant]')."))]
QuantizeOpt = Annotated[str, typer.Option(
    "--quantize", rich_help_panel=MODEL_PANEL, help="CPU only: decode steps multiply by weight-only int8 or "
    "int4 copies of the linear layers (int4: the LM head in int8), in bfloat16; prefill keeps the --dtype "
    "weights. Packed once per model and cached. none, int8 or int4.")]
KvQuantizeOpt = Annotated[Optional[str], typer.Option(
    "--kv-quantize", rich_help_panel=MODEL_PANEL, help="CPU only: the window's keys and values as int8 with a "
    "scale per token and head (about half of bfloat16's bytes); decode steps read them through PyTorch's int8 "
    "kernel. none or int8 [default: none].")]
NLocalOpt = Annotated[Optional[int], typer.Option(
    "--n-local", rich_help_panel=ATTENTION_PANEL,
    help=("Local window in tokens [default: the model's trained length]."))]
NGlobalOpt = Annotated[Optional[int], typer.Option(
    "--n-global", rich_help_panel=ATTENTION_PANEL,
    help=("Leading tokens every query keeps seeing [default: 100]."))]
LimitOpt = Annotated[Optional[int], typer.Option(
    "--limit-distance", rich_help_panel=ATTENTION_PANEL,
    help=("Distance cap L for the global branch [default: trained length]."))]
ChunkOpt = Annotated[Optional[int], typer.Option(
    "--chunk-size", rich_help_panel=ATTENTION_PANEL, help=("Tokens per prefill forward pass [default: 512]."))]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="After the reply, print on stderr: prompt tokens and encode speed, time to first token, "
    "generated tokens and speed, peak memory (--json output always has them).")]
SystemOpt = Annotated[Optional[str], typer.Option(
    "--system", "-s", metavar="TEXT", help="System prompt, given through the model's chat template. It is encoded "
    "with the document: a saved state needs the one it was encoded with.")]
RetrievalOpt = Annotated[Optional[bool], typer.Option(
    "--retrieval/--no-retrieval", rich_help_panel=RETRIEVAL_PANEL, show_default=False,
    help="--retrieval: the generated tokens also attend to the best-matching middle tokens (top-k per head, "
    "kept in host memory; the --middle-* and window options override the recipe). --no-retrieval: Λ-attention "
    "alone, and ask/chat re-read no passage. [default: ask and chat re-read the passage a question is about "
    "(--reread), no middle tokens attended; see docs/usage.md]")]
MiddleTopKOpt = Annotated[Optional[int], typer.Option(
    "--middle-top-k", rich_help_panel=RETRIEVAL_PANEL,
    help=("The token being generated also attends to the K best-matching "
               "middle tokens (beyond the window); 0 = off [default: 0, or 5 with --retrieval]."))]
MiddleLayerOpt = Annotated[Optional[int], typer.Option(
    "--middle-from-layer", rich_help_panel=RETRIEVAL_PANEL,
    help=("First layer that retrieves [default: 4, as in the paper]."))]
MiddleDistanceOpt = Annotated[Optional[int], typer.Option(
    "--middle-distance", rich_help_panel=RETRIEVAL_PANEL,
    help=("Distance at which retrieved tokens are scored [default: trained length / 8]."))]
MiddleBlocksOpt = Annotated[Optional[int], typer.Option(
    "--middle-blocks", rich_help_panel=RETRIEVAL_PANEL,
    help=("Blocks of 64 middle tokens each KV head reads per step, chosen by their summary "
               "keys (fixed cost at any length); 0 = exact search of every stored token [default: 16]."))]
MiddleDirOpt = Annotated[Optional[str], typer.Option(
    "--middle-dir", metavar="DIR", rich_help_panel=RETRIEVAL_PANEL,
    help="Keep the middle store in memory-mapped files in this directory instead of "
    "RAM (very long inputs; the files are unlinked at once, so nothing is left there).")]
MiddleDtypeOpt = Annotated[Optional[str], typer.Option(
    "--middle-dtype", rich_help_panel=RETRIEVAL_PANEL,
    help=("Precision of the middle store in host memory: auto (float16 for a "
               "float32 model, else the model's), float16, bfloat16, float32, or int8 (per-token scales: half of "
               "float16's bytes) [default: auto]."))]

MiddleUnitOpt = Annotated[Optional[str], typer.Option(
    "--middle-unit", rich_help_panel=RETRIEVAL_PANEL,
    help="What --middle-top-k counts: token (the K best tokens per head), or block (every token of the K best "
    "blocks of 64, so a fact comes back whole) [default: token].")]

def _sampling_default(field: str, fmt: str = "{}") -> str:
    """'[default: the model's generation_config; else X for continue, Y for answers]' from the defaults in use."""
    from ..sampling import ANSWER_DEFAULTS, CONTINUE_DEFAULTS

    a, b = fmt.format(getattr(CONTINUE_DEFAULTS, field)), fmt.format(getattr(ANSWER_DEFAULTS, field))
    return f"[default: the model's generation_config; else {a} for continue, {b} for ask, summarize, chat]"


TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", "--temp", rich_help_panel=SAMPLING_PANEL,
    help="0 = greedy: always the most likely token (exactly; a default repeat penalty is then dropped). "
    + _sampling_default("temperature", "{:g}"))]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", rich_help_panel=SAMPLING_PANEL, help="Sample from the most likely tokens whose probabilities add up "
    "to P (1 = off). " + _sampling_default("top_p", "{:g}"))]
TopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", rich_help_panel=SAMPLING_PANEL, help="Sample among the K most likely tokens (0 = off). "
    + _sampling_default("top_k"))]
MinPOpt = Annotated[Optional[float], typer.Option(
    "--min-p", rich_help_panel=SAMPLING_PANEL, help="Drop tokens less likely than P times the most likely one "
    "(0 = off). " + _sampling_default("min_p", "{:g}"))]
RepeatPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--repeat-penalty", rich_help_panel=SAMPLING_PANEL, help="Make tokens seen in the last --repeat-last-n "
    "tokens less likely (transformers' repetition_penalty: scores divided by it; 1 = off). "
    + _sampling_default("repeat_penalty", "{:g}"))]
RepeatLastNOpt = Annotated[Optional[int], typer.Option(
    "--repeat-last-n", rich_help_panel=SAMPLING_PANEL, help=(
        "Tokens (prompt and reply) the repeat penalty looks back on; 0 = off [default: 64]."))]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", rich_help_panel=SAMPLING_PANEL, help="Random seed, for a reproducible sample.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", metavar="TEXT", rich_help_panel=SAMPLING_PANEL,
    help="End the reply where it produces this text (not printed); repeat for several.")]

# ask, chat and eval needle refuse a re-read by attention where nothing attends to the middle.
ATTENTION_NEEDS_KV = ("--reread-by attention follows the retrieval of middle tokens: add --retrieval "
                      "(or use --reread-by words)")

# The EngineOptions fields that are LambdaSettings.for_model keywords, and those that only steer retrieval.
SETTINGS_FIELDS = ("n_local", "n_global", "limit_distance", "chunk_size", "kv_quantize", "retrieval", "middle_top_k",
                   "middle_from_layer", "middle_distance", "middle_blocks", "middle_dtype", "middle_dir", "middle_unit")
RETRIEVAL = ("retrieval", "middle_top_k", "middle_from_layer", "middle_distance", "middle_blocks", "middle_dtype",
             "middle_dir", "middle_unit")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The model, attention and retrieval options of every command that loads a model."""

    model: ModelOpt = None
    device: DeviceOpt = "auto"
    dtype: DtypeOpt = "auto"
    device_map: DeviceMapOpt = None
    max_memory: MaxMemoryOpt = None
    load_in: LoadInOpt = None
    quantize: QuantizeOpt = "none"
    kv_quantize: KvQuantizeOpt = None
    n_local: NLocalOpt = None
    n_global: NGlobalOpt = None
    limit_distance: LimitOpt = None
    chunk_size: ChunkOpt = None
    retrieval: RetrievalOpt = None
    middle_top_k: MiddleTopKOpt = None
    middle_from_layer: MiddleLayerOpt = None
    middle_distance: MiddleDistanceOpt = None
    middle_blocks: MiddleBlocksOpt = None
    middle_dtype: MiddleDtypeOpt = None
    middle_dir: MiddleDirOpt = None
    middle_unit: MiddleUnitOpt = None
    quiet: QuietOpt = False

    def requested(self) -> dict[str, Any]:
        """The settings asked for, as LambdaSettings.for_model keywords (None: not given).

        Checked at once by building them against a model of any length, so bad values
        fail before the (slow) model load; the real settings are built again, with the
        model's trained length, by the API.  The placement options are checked here too.
        """
        from ..quant import check_mode
        from ..settings import MAX_TOKENS, LambdaSettings

        check_mode(self.quantize)
        given = {name: getattr(self, name) for name in SETTINGS_FIELDS}
        LambdaSettings.for_model(MAX_TOKENS, **given)
        self.check_placement()
        return given

    def check_placement(self) -> None:
        """--device-map, --max-memory and --load-in, checked before anything loads."""
        if self.device_map is None and self.max_memory is None and self.load_in is None:
            return  # (and torch stays unimported until the model loads)
        from ..errors import SettingsError
        from ..models import LOAD_IN, parse_device_map, parse_max_memory

        parse_device_map(self.device_map)
        parse_max_memory(self.max_memory)
        if self.load_in is not None and self.load_in not in LOAD_IN:
            raise SettingsError("load_in", f"must be 4bit or 8bit, got '{self.load_in}'")

    def load(self):
        """The model these options name (a spinner on stderr while it loads)."""
        from .output import status

        with status("Loading model", self.quiet):
            from ..models import load_model

            return load_model(self.model, self.device, self.dtype, device_map=self.device_map,
                              max_memory=self.max_memory, load_in=self.load_in, quantize=self.quantize)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Sampling options of every command that generates text (None: not given, so the command's defaults apply)."""

    temperature: TemperatureOpt = None
    top_p: TopPOpt = None
    top_k: TopKOpt = None
    min_p: MinPOpt = None
    repeat_penalty: RepeatPenaltyOpt = None
    repeat_last_n: RepeatLastNOpt = None
    seed: SeedOpt = None
    stop: StopOpt = None

    def given(self) -> dict[str, Any]:
        """The options given, as SamplingParams fields, checked at once (before the model loads)."""
        from ..sampling import SamplingParams

        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        SamplingParams().resolve(given)
        return given

    def params(self, lm: Any, task: str):
        """The SamplingParams of `task` ("continue" or "answer") on this model: its defaults
        (the model's generation_config, else lminf's), with the options given on top."""
        from ..sampling import model_defaults

        return model_defaults(getattr(lm.model, "generation_config", None), task).resolve(self.given())


def with_options(group: type, name: str, exclude: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Give a Typer command the fields of dataclass `group` as options, handed to it as one `name` argument.

    One declaration of each shared option (help, default) instead of a copy in every
    command; `exclude` leaves out fields that mean nothing for that command.  Typer reads
    a command's options from its signature, so the wrapper's signature lists the fields.
    """
    hints = typing.get_type_hints(group, include_extras=True)
    fields = [f for f in dataclasses.fields(group) if f.name not in exclude]

    def decorate(fn: Callable) -> Callable:
        fn_hints = typing.get_type_hints(fn, include_extras=True)
        sig = inspect.signature(fn)
        own = [p.replace(annotation=fn_hints.get(p.name, p.annotation))
               for p in sig.parameters.values() if p.name != name]
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                   annotation=hints[f.name]) for f in fields]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in fields}
            return fn(*args, **{name: group(**values)}, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD else p
                  for p in own] + added
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


# Value placeholders in help as Unix tools write them (typer would write <int>, <list[str]>).
_METAVARS = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "Path": "PATH"}
HELP_OPTIONS = ["-h", "--help"]


class HelpGroup(TyperGroup):
    """A command group with -h, and no placeholder after its flags (--version, --help)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.context_settings.setdefault("help_option_names", HELP_OPTIONS)
        for param in self.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # Bare `lminf` or `lminf eval`: the help, on stdout and with success, as --help gives it
        # (click would raise it as a usage error: one squashed line on stderr, exit 2).
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            typer.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)


class LminfCommand(TyperCommand):
    """A command whose help reads like other command-line tools': INTEGER and TEXT placeholders,
    none after a flag, and `FILE...` instead of `{FILE}...` in the usage line; -h as --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.context_settings.setdefault("help_option_names", HELP_OPTIONS)
        # Help is plain text: rich (the formatter) would take "[default: 100]" for a style tag.
        self.help = rich.markup.escape(self.help) if self.help else self.help
        for param in self.params:
            if getattr(param, "help", None):
                param.help = rich.markup.escape(param.help)
        for param in self.params:
            if param.metavar is not None:
                continue
            if getattr(param, "is_flag", False):
                param.metavar = ""  # a flag takes no value
            elif param.param_type_name == "option":
                bare = param.bare_type().removeprefix("list[").removesuffix("]")
                param.metavar = _METAVARS.get(bare, bare.upper())
        for param in self.params:
            if param.param_type_name == "argument":
                # The name column shows the argument already; a type column would repeat it.
                param.display_type_rich = lambda ctx: None

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = param.metavar or param.name.upper()
            if param.nargs != 1 and "..." not in name:
                name += "..."
            pieces.append(name if param.required else f"[{name}]")
        return pieces


def check_positive(name: str, value: int | None) -> None:
    """A command's own count option (not a setting) must be positive."""
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be positive, got {value}")
