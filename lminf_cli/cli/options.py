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

import typer

from ..errors import UsageError

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Local HF directory, .gguf file or cached hub id [default: $LMINF_MODEL, "
    "else the embedded SmolLM2-135M-Instruct].")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on GPU and on CPUs with AMX or AVX-512 BF16, else "
                                       "float32), float32, bfloat16, float16.")]
QuantizeOpt = Annotated[str, typer.Option(
    "--quantize", help="CPU only: decode steps multiply by weight-only int8 or int4 copies of the linear layers "
    "(int4: the LM head in int8), in bfloat16; prefill keeps the --dtype weights. Packed once per model and "
    "cached. none, int8 or int4.")]
NLocalOpt = Annotated[Optional[int], typer.Option(
    "--n-local", help="Local window in tokens [default: the model's trained length].")]
NGlobalOpt = Annotated[Optional[int], typer.Option(
    "--n-global", help="Leading tokens every query keeps seeing [default: 100].")]
LimitOpt = Annotated[Optional[int], typer.Option(
    "--limit-distance", help="Distance cap L for the global branch [default: trained length].")]
ChunkOpt = Annotated[Optional[int], typer.Option(
    "--chunk-size", help="Tokens per prefill forward pass [default: 512].")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
RetrievalOpt = Annotated[Optional[bool], typer.Option(
    "--retrieval/--no-retrieval", help="Find facts anywhere in a long document: retrieval of middle tokens with "
    "the measured recipe (see docs/usage.md); the --middle-* and window options still override it. Keeps the "
    "document's middle in host memory. [default: on for ask, chat, summarize and encode when the document is "
    "longer than the window; off for continue and eval]", show_default=False)]
MiddleTopKOpt = Annotated[Optional[int], typer.Option(
    "--middle-top-k", help="Retrieval: the token being generated also attends to the K best-matching "
    "middle tokens (beyond the window); 0 = off [default: 0, or 5 with --retrieval].")]
MiddleLayerOpt = Annotated[Optional[int], typer.Option(
    "--middle-from-layer", help="Retrieval: first layer that retrieves [default: 4, as in the paper].")]
MiddleDistanceOpt = Annotated[Optional[int], typer.Option(
    "--middle-distance", help="Retrieval: distance at which retrieved tokens are scored [default: trained "
    "length / 8].")]
MiddleBlocksOpt = Annotated[Optional[int], typer.Option(
    "--middle-blocks", help="Retrieval: blocks of 64 middle tokens each KV head reads per step, chosen by "
    "their summary keys (fixed cost at any length); 0 = exact search of every stored token [default: 16].")]
MiddleDirOpt = Annotated[Optional[str], typer.Option(
    "--middle-dir", help="Retrieval: keep the middle store in memory-mapped files in this directory instead of "
    "RAM (very long inputs; the files are unlinked at once, so nothing is left there).")]
MiddleDtypeOpt = Annotated[Optional[str], typer.Option(
    "--middle-dtype", help="Retrieval: precision of the middle store in host memory: auto (float16 for a "
    "float32 model, else the model's), float16, bfloat16, float32, or int8 (per-token scales: half of float16's "
    "bytes) [default: auto].")]

MiddleUnitOpt = Annotated[Optional[str], typer.Option(
    "--middle-unit", help="Retrieval: what --middle-top-k counts: token (the K best tokens per head), or block "
    "(every token of the K best blocks of 64, so a fact comes back whole) [default: token].")]

TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass.")]
TopKOpt = Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = all).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed for sampling.")]

# The EngineOptions fields that are LambdaSettings.for_model keywords, and those that only steer retrieval.
SETTINGS_FIELDS = ("n_local", "n_global", "limit_distance", "chunk_size", "retrieval", "middle_top_k",
                   "middle_from_layer", "middle_distance", "middle_blocks", "middle_dtype", "middle_dir", "middle_unit")
RETRIEVAL = ("retrieval", "middle_top_k", "middle_from_layer", "middle_distance", "middle_blocks", "middle_dtype",
             "middle_dir", "middle_unit")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The model, attention and retrieval options of every command that loads a model."""

    model: ModelOpt = None
    device: DeviceOpt = "auto"
    dtype: DtypeOpt = "auto"
    quantize: QuantizeOpt = "none"
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
        model's trained length, by the API.
        """
        from ..quant import check_mode
        from ..settings import MAX_TOKENS, LambdaSettings

        check_mode(self.quantize)
        given = {name: getattr(self, name) for name in SETTINGS_FIELDS}
        LambdaSettings.for_model(MAX_TOKENS, **given)
        return given

    def load(self):
        """The model these options name (a spinner on stderr while it loads)."""
        from ..models import load_model
        from .output import status

        with status("Loading model", self.quiet):
            return load_model(self.model, self.device, self.dtype, quantize=self.quantize)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Sampling options of every command that generates text (greedy by default)."""

    temperature: TemperatureOpt = 0.0
    top_p: TopPOpt = 1.0
    top_k: TopKOpt = 0
    seed: SeedOpt = None

    def params(self):
        """The SamplingParams these options describe (validated when built)."""
        from ..sampling import SamplingParams

        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)


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


def check_positive(name: str, value: int | None) -> None:
    """A command's own count option (not a setting) must be positive."""
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be positive, got {value}")
