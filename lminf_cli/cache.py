"""The constant-memory Λ cache: its state, its masks and its byte count.

Per layer it keeps
  * a ring of the most recent tokens' keys/values (keys rotated at positions
    relative to a moving origin `base`), with room for the window plus one
    chunk so that a chunk can be written before it is attended to;
  * the first n_global tokens' keys (unrotated) and values.
Nothing else is ever stored, so the bytes held are fixed when the cache is
made, whatever the stream length.  Every `rebase_every` tokens the ring is
rotated back so that rotation angles stay small: precision does not decay
after millions of tokens.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .attention import (
    FLASH_CPU,
    NEG_INF,
    SPLIT_MIN_ROWS,
    LocalSplit,
    Rope,
    lambda_attention,
    merge_extra_keys,
    small_matmul,
)
from .errors import InputError, UsageError
from .retrieval import MiddleStore
from .ring import FloatRing, Int8Ring, checked_tensor, make_ring
from .settings import RETRIEVAL_KNOBS, LambdaSettings


@dataclass
class StepPlan:
    """Everything the layers share for one forward of `n_new` tokens."""

    start: int                 # index of the first new token in the stream
    n_new: int
    q_cos: Tensor              # [C, R] rotation of queries/keys at relative positions
    q_sin: Tensor
    cap_cos: Tensor            # [1, R] rotation to the distance cap L
    cap_sin: Tensor
    ring_slots: Tensor         # [C] ring slot of each new token
    ring_view: int             # attend to ring[:ring_view] (a prefix until it wraps)
    local_bias: Tensor | None  # [g*C, ring_view] 0 / -inf (None when `split` stands for it)
    global_new: tuple[int, int] | None  # new tokens [a, b) of the chunk that are global tokens
    global_view: int           # number of stored global keys attended to
    global_bias: Tensor | None  # [g*C, global_view] or None when no query sees one
    evict_slots: Tensor | None = None  # ring slots of tokens leaving the window into the middle store
    evict_cos: Tensor | None = None    # rotation back to unrotated keys for them
    evict_sin: Tensor | None = None
    evict_span: tuple[int, int] | None = None  # the same slots as a slice, when they do not wrap
    evict_mat: Tensor | None = None    # one evicted token: its un-rotation as a [D, D] matrix
    retrieve: bool = False             # the last row also attends to the top-k middle tokens
    ins_cos: Tensor | None = None      # rotation of that query to the insertion distance
    ins_sin: Tensor | None = None
    window_bias: dict[int, Tensor] = field(default_factory=dict)  # sliding window -> [g*C, ring_view]
    ring_span: tuple[int, int] | None = None  # the same slots as a slice, when they do not wrap
    split: LocalSplit | None = None    # the local branch as unmasked spans + masked edges (CPU prefill)
    step_mat: Tensor | None = None     # one-token forwards: [D, 2D] = [rotation at r | rotation to L],
    #                                    [D, 3D] with [... | rotation to the insertion distance] when retrieving
    moved: dict = field(default_factory=dict, repr=False, init=False)

    def on(self, device: torch.device) -> StepPlan:
        """This plan with its tensors on `device` (models split across devices), memoised."""
        if self.q_cos.device == device:
            return self
        if device not in self.moved:
            fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
            fields["window_bias"] = {w: b.to(device) for w, b in self.window_bias.items()}
            if self.split is not None:
                fields["split"] = replace(self.split, edge_slots=self.split.edge_slots.to(device),
                                          edge_bias=self.split.edge_bias.to(device))
            self.moved[device] = StepPlan(**{k: v.to(device) if isinstance(v, Tensor) else v
                                             for k, v in fields.items()})
        return self.moved[device]


class LayerCache:
    """One layer's buffers.  Attends a block of new tokens and stores them."""

    def __init__(self, owner: LambdaCache, n_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, middle: MiddleStore | None = None,
                 index: int = 0) -> None:
        self.index = index  # layer number: retrieval starts at settings.middle_from_layer
        self.device = torch.device(device)  # layers differ when a device map split the model
        # A weak reference: a strong one would make a cycle, and a dropped cache would hold
        # its (GPU) buffers until the garbage collector happened to run.
        self.owner = weakref.proxy(owner)
        self.middle = middle
        glob = owner.settings.n_global
        # The window's keys and values (ring.py: in the cache's dtype, or int8 with kv_quantize="int8").
        self.ring: FloatRing | Int8Ring = make_ring(owner.settings.kv_quantize, n_kv_heads, owner.ring_size,
                                                    head_dim, self.device, dtype)
        self.k_global = torch.zeros(1, n_kv_heads, glob, head_dim, device=device, dtype=dtype)
        self.v_global = torch.zeros_like(self.k_global)

    @property
    def k_ring(self) -> Tensor:
        """The ring's key buffer [1, Hkv, ring, D] (int8 in an int8 ring)."""
        return self.ring.k

    @property
    def v_ring(self) -> Tensor:
        """The ring's value buffer ([1, Hkv, D, ring] int8 in an int8 ring)."""
        return self.ring.v if isinstance(self.ring, FloatRing) else self.ring.vt

    def buffers(self) -> tuple[Tensor, ...]:
        """Every tensor this layer keeps (a captured graph bakes their addresses in)."""
        return (*self.ring.buffers(), self.k_global, self.v_global)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, plan: StepPlan) -> Tensor:
        """q [1, H, C, D], k/v [1, Hkv, C, D], all unrotated; returns [1, H, C, D]."""
        plan = plan.on(self.device)
        rope, scale = self.owner.rope, self.owner.scale
        if rope.scaling != 1.0:
            q, k = q * rope.scaling, k * rope.scaling
        q_cap = q_ins = None
        direct = isinstance(self.ring, Int8Ring) and plan.n_new == 1  # decode straight from the int8 ring
        if plan.step_mat is not None:
            # Decode: every rotation of q, and k's, as one matmul with the step's matrix (k's extra
            # columns are a few multiplications, a second call ~10 us a layer).
            d, h = q.shape[-1], q.shape[1]
            both = small_matmul(torch.cat([q, k], dim=1), plan.step_mat)         # [1, H + Hkv, 1, 2D or 3D]
            if not direct:  # the int8 ring rounds them itself (from float32 on the CPU)
                both = both.to(q.dtype)
            q_local, q_cap = both[:, :h, :, :d], both[:, :h, :, d:2 * d]
            if both.shape[-1] > 2 * d:
                q_ins = both[0, :h, -1, 2 * d:].to(q.dtype)                      # [H, D]
            k_rot = both[:, h:, :, :d]                                           # [1, Hkv, 1, D]
        else:
            q_local = rope.rotate(q, plan.q_cos, plan.q_sin)
            k_rot = rope.rotate(k, plan.q_cos, plan.q_sin)
        self.ring.write(k_rot, v, plan.ring_span if plan.ring_span is not None else plan.ring_slots)
        if plan.global_new is not None:
            a, b = plan.global_new
            # Global keys are kept unrotated: the query is rotated to L instead.
            self.k_global[:, :, plan.start + a:plan.start + b] = k[:, :, a:b]
            self.v_global[:, :, plan.start + a:plan.start + b] = v[:, :, a:b]
        if self.middle is not None and plan.evict_slots is not None:
            self._evict(plan)
        n = plan.ring_view
        if plan.global_bias is None:
            q_cap = q_local  # unused by lambda_attention
        elif q_cap is None:
            q_cap = rope.rotate(q, plan.cap_cos, plan.cap_sin)
        gv = plan.global_view
        retrieve = (plan.retrieve and self.middle is not None and self.middle.length > 0
                    and self.index >= self.owner.settings.middle_from_layer)
        if direct:
            # Decode: both products straight from the int8 ring (plan built a slot mask for it).
            b, h, c, d = q.shape
            hkv = self.k_global.shape[1]
            o, lse = self.ring.attend_one(q_local.reshape(hkv, -1, d), q_cap.reshape(hkv, -1, d), n, plan.local_bias,
                                          self.k_global[:, :, :gv], self.v_global[:, :, :gv], plan.global_bias,
                                          scale, self.owner.softcap, return_lse=retrieve)
            out = o.to(q.dtype).view(b, h, c, d)
            out = (out, lse[None]) if retrieve else out
        else:
            k_local, v_local = self.ring.view(n)  # views, or the int8 ring de-quantized for a prefill block
            out = lambda_attention(
                q_local, q_cap, k_local, v_local, plan.local_bias,
                self.k_global[:, :, :gv], self.v_global[:, :, :gv], plan.global_bias,
                scale, fused=self.owner.fused, return_lse=retrieve, softcap=self.owner.softcap, split=plan.split,
            )
        if not retrieve:
            return out
        return self._retrieve(*out, q, q_ins, plan)

    def _evict(self, plan: StepPlan) -> None:
        """Tokens leaving the window: un-rotate their keys and keep them for retrieval."""
        leaving, values = self.ring.rows(plan.evict_span if plan.evict_span is not None
                                         else plan.evict_slots)                     # [Hkv, n, D]
        if plan.evict_mat is not None:
            unrotated = small_matmul(leaving, plan.evict_mat).to(leaving.dtype)
        else:
            unrotated = self.owner.rope.rotate(leaving, plan.evict_cos, plan.evict_sin)
        self.middle.append(unrotated, values)

    def _retrieve(self, out: Tensor, lse: Tensor, q: Tensor, q_ins: Tensor | None, plan: StepPlan) -> Tensor:
        """The last row of `out` [1, H, C, D] also attends to its top-k middle tokens (joint softmax via lse)."""
        b, h, c, d = out.shape
        g = h // lse.shape[1]
        last_lse = lse.view(b, lse.shape[1], g, c)[0, :, :, -1].reshape(h)      # [H], head = kv * g + gi
        if q_ins is None:
            q_ins = self.owner.rope.rotate(q[0, :, -1], plan.ins_cos, plan.ins_sin)  # [H, D]
        s = self.owner.settings
        if s.middle_unit == "block":
            scores, values = self.middle.top_blocks(q_ins, s.middle_top_k, g, max_blocks=s.middle_blocks)
        else:
            scores, _, values = self.middle.top_k(q_ins, s.middle_top_k, g, max_blocks=s.middle_blocks,
                                                  with_keys=False)
        scores = scores * self.owner.scale
        if self.owner.softcap is not None:  # Gemma 2: middle scores are capped like both Λ branches
            # tanh is monotonic, so the top-k of the capped scores are the top-k of the raw ones.
            scores = torch.tanh(scores / self.owner.softcap) * self.owner.softcap
        # `out` is this call's own tensor: its last row can be replaced in place.
        out[0, :, -1] = merge_extra_keys(out[0, :, -1], last_lse, scores, values)
        return out

    def rotate_ring(self, cos: Tensor, sin: Tensor) -> None:
        """Rotate every ring key by one angle (re-basing relative positions)."""
        rope = self.owner.rope
        self.ring.rotate(lambda k: rope.rotate(k, cos.to(k.dtype), sin.to(k.dtype)))

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's buffers."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    @property
    def middle_nbytes(self) -> int:
        """Bytes of this layer's middle store (0 without retrieval)."""
        return self.middle.nbytes if self.middle is not None else 0


@dataclass
class CacheSnapshot:
    """A point in a cache's stream to come back to (see LambdaCache.snapshot)."""

    budget: int
    length: int
    base: int
    rebases: int
    middle_lengths: list[int]
    slots: Tensor | None                 # ring slots saved, or None: the whole ring
    saved: list[tuple[tuple[Tensor, ...], tuple[Tensor, Tensor] | None]]  # per layer: ring (ring.save), globals


class LambdaCache:
    """Λ-attention KV cache for a whole model; its size is fixed at creation.

    The step protocol (the engine drives it; adapters only attend through it):

        plan = cache.plan(n_new, retrieve_last=...)   # rotations, slots, masks for all layers
        logits = adapter.forward(ids, cache, plan)     # every layer attends through cache.layers[i]
        cache.commit(plan)                             # the stream is now n_new tokens longer

    `plan` may re-base the ring first (a bookkeeping rotation that changes no attention
    result); it records nothing else, so a plan that is not committed (a captured graph's
    warm-up) leaves the counters as they were.  The cache owns its state:
    `state_dict`/`meta_state`/`load_state_dict` for files, `snapshot`/`restore` for detours.

    `splits_local`: whether CPU prefill may cut the local branch (LocalSplit); ALiBi
    caches add per-head biases to the full local mask instead.
    """

    splits_local = True

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, rope: Rope,
                 settings: LambdaSettings, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, scale: float | None = None,
                 fused: bool = True, rebase_every: int | None = None, softcap: float | None = None,
                 layer_windows: Sequence[int | None] | None = None,
                 layer_devices: list[torch.device] | None = None,
                 store_device: torch.device | str = "cpu") -> None:
        self.settings = settings
        self.rope = rope
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.groups = n_heads // n_kv_heads
        # The ring holds n_local + chunk tokens so a block can be stored before it is attended to
        # without overwriting keys that earlier queries of the same block still need.
        self.max_chunk = settings.chunk_size
        self.ring_size = settings.ring_size
        self.device, self.dtype = torch.device(device), dtype
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.fused = fused
        self.softcap = softcap
        self.kv_int8 = settings.kv_quantize == "int8"
        # Relative positions stay below about 2 * ring_size + max_chunk.
        self.rebase_every = rebase_every or self.ring_size
        self.length = 0          # tokens seen so far
        self.base = 0            # stream index whose relative position is 0
        self.rebases = 0
        self._cap_mat: Tensor | None = None
        self._script_rings: list[list[Tensor]] | None = None  # script_rings, made on first use
        self._native_rings: list[Tensor] | None = None  # native_rings, made on first use
        self._ins: tuple[int, Tensor, Tensor, Tensor] | None = None  # (insertion distance, cos, sin, matrix)
        self._cap: tuple[Tensor, Tensor] | None = None
        self.graphs: dict = {}   # captured forwards by (block size, logits, ...): graphs.StepGraph
        # A layer whose own sliding window fits in n_local keeps the model's rule:
        # that window and nothing else (it was trained never to see further).
        windows = list(layer_windows or [None] * n_layers)
        self.windows = sorted({w for w in windows if w is not None and w <= settings.n_local})
        devices = [torch.device(d) for d in (layer_devices or [self.device] * n_layers)]
        if self.kv_int8:
            if any(d.type != "cpu" for d in devices):
                raise UsageError("--kv-quantize int8 runs on the CPU only (PyTorch's int8 CPU kernel): use --device "
                                 "cpu, or --kv-quantize none")
            if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
                raise UsageError(f"--kv-quantize int8 needs PyTorch's int8 CPU kernel, which torch {torch.__version__} "
                                 "lacks (use --kv-quantize none)")
        self.layers = []
        for i, (dev, w) in enumerate(zip(devices, windows, strict=True)):
            if w in self.windows:
                self.layers.append(SlidingLayerCache(self, n_kv_heads, head_dim, dev, dtype, w))
                continue
            middle = None
            if settings.middle_top_k and i >= settings.middle_from_layer:
                middle = MiddleStore(n_kv_heads, head_dim, settings.middle_block, dev, torch.device(store_device),
                                     settings.store_dtype(dtype), spill_dir=settings.middle_dir)
            self.layers.append(LayerCache(self, n_kv_heads, head_dim, dev, dtype, middle, index=i))
        self.has_middle = any(layer.middle is not None for layer in self.layers)
        self._stores_from = settings.middle_from_layer

    # -- bookkeeping -------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of K/V state held; constant for the life of the cache."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def middle_nbytes(self) -> int:
        """Bytes of the middle stores (grows with the stream; off the fast device)."""
        return sum(layer.middle_nbytes for layer in self.layers)

    @property
    def stored_upto(self) -> int:
        """Middle tokens before this stream index are in the stores (those after are still in the ring)."""
        return max(self.settings.n_global, self.length - self.settings.n_local)

    def set_retrieval(self, top_k: int, from_layer: int | None = None, distance: int | None = None,
                      blocks: int | None = None, unit: str | None = None) -> None:
        """Change top-k retrieval for the rows still to come; 0 switches it off.

        Everything else in the cache is independent of these five, so one encoded
        stream can be asked under several retrieval settings (snapshot, ask, restore).
        Stores exist only for the layers chosen when the cache was made.
        """
        s = self.settings
        knobs = dict(zip(RETRIEVAL_KNOBS, (top_k, from_layer, distance, blocks, unit), strict=True))
        s = s.replace(**{k: v for k, v in knobs.items() if v is not None})
        if s.middle_top_k and not self.has_middle:
            raise UsageError("this cache keeps no middle-token store (it was made without retrieval)")
        if s.middle_from_layer < self._stores_from:
            raise UsageError(f"retrieval can start at layer {self._stores_from} or later (the stores this cache "
                             f"keeps), not at {s.middle_from_layer}")
        self.settings = s

    @property
    def max_relative_position(self) -> int:
        """Largest relative position a rotation has used so far (bounded)."""
        return max(0, self.length - 1 - self.base)

    def _slot_positions(self, total: int, view: int) -> Tensor:
        """Stream index held by each of the first `view` ring slots once `total` tokens are stored ([view],
        on the cache's device: masks are built where they are used, never copied over)."""
        slots = torch.arange(view, device=self.device)
        return slots + self.ring_size * torch.div(total - 1 - slots, self.ring_size, rounding_mode="floor")

    def _maybe_rebase(self, end: int) -> None:
        if end - self.base <= self.rebase_every + self.ring_size:
            return
        # Keep the oldest stored token at relative position >= 0.
        new_base = max(self.base, self.length - self.ring_size)
        delta = new_base - self.base
        if delta == 0:
            return
        cos, sin = self.rope.cos_sin(torch.tensor([-delta]), self.device, self.dtype)
        for layer in self.layers:
            layer.rotate_ring(cos.to(layer.device), sin.to(layer.device))
        self.base = new_base
        self.rebases += 1

    # -- the step protocol ---------------------------------------------------
    def plan(self, n_new: int, retrieve_last: bool = False, *, static: bool = False) -> StepPlan:
        """Prepare a forward of n_new tokens: rotations, slots and masks, shared by all layers.

        `retrieve_last`: the block's last row is the one that will be continued (sampled
        from), so it also attends to its top-k middle tokens when retrieval is on.  No
        other row ever retrieves: the state after a stream is then the same however the
        stream was cut into forwards.
        `static`: for a forward replayed from static buffers (graphs.py): masks only, never
        a LocalSplit, whose host-side spans move with every block.
        """
        if not 0 < n_new <= self.max_chunk:
            raise ValueError(f"a forward adds 1..{self.max_chunk} tokens, got {n_new}")
        s = self.settings
        start, end = self.length, self.length + n_new
        self._maybe_rebase(end)
        # Angles in float64 on the host (exact at any offset); index arithmetic and masks on the device.
        q_cos, q_sin = self.rope.cos_sin(torch.arange(start, end) - self.base, self.device, self.dtype)
        cap_cos, cap_sin = self._cap_cos_sin()
        idx = torch.arange(start, end, device=self.device)                # [C] stream indices

        ring_view = min(end, self.ring_size)
        split = None if static else self._local_split(start, n_new)
        local_bias, window_bias = None, {}
        if split is None or self.windows:  # a [g*C, N] mask: tens of MB at 8k keys, built only when used
            kpos = self._slot_positions(end, ring_view)[None, :]             # [1, N] index in each slot
            qpos = idx[:, None]                                               # [C, 1] stream index of each new row
            # Comparisons broadcast straight to [C, N] bools: an int64 [C, N] of distances was the
            # largest temporary of a prefill chunk while the window fills (35 MB at 8k keys).
            local_ok = (kpos <= qpos) & (kpos > qpos - s.n_local) & (kpos >= 0)  # [C, N]
            local_bias = self._bias(local_ok)
            window_bias = {w: local_bias if w == s.n_local else self._bias(local_ok & (kpos > qpos - w))
                           for w in self.windows}

        global_new = None
        if start < s.n_global:
            global_new = (0, min(end, s.n_global) - start)
        global_view = min(end, s.n_global)
        global_bias = None
        if global_view and end - 1 >= s.n_local:  # some query is far enough from token 0
            gdist = idx[:, None] - torch.arange(global_view, device=self.device)[None, :]  # [C, G]
            global_bias = self._bias(gdist >= s.n_local)
        plan = StepPlan(start, n_new, q_cos, q_sin, cap_cos, cap_sin, idx % self.ring_size,
                        ring_view, local_bias, global_new, global_view, global_bias, window_bias=window_bias,
                        split=split)
        first = start % self.ring_size
        if first + n_new <= self.ring_size:
            plan.ring_span = (first, first + n_new)
        if self.has_middle:  # stores keep filling even while retrieval is switched off
            self._plan_middle(plan, end, retrieve_last)
        if n_new == 1 and self.rope.rotary_dim:
            mats = [self.rope.matrix(q_cos, q_sin), self._cap_matrix()]
            if plan.retrieve:
                mats.append(self._ins_rotation()[2])
            plan.step_mat = torch.cat(mats, dim=1)
            if plan.step_mat.device.type == "cpu":  # small_matmul runs in float32 there: convert once, not per layer
                plan.step_mat = plan.step_mat.float()
        return plan

    def script_rings(self, plan: StepPlan) -> list[list[Tensor]] | None:
        """Every layer's window for one scripted call of the layer stack (step_script.llama_layers),
        when `plan` is a one-token step that every layer takes alike; else None (layer by layer).

        Alike: an int8 window on the CPU in every layer, no retrieval and no token leaving for the
        middle store in this step, no global token written, no sliding window, no RoPE scaling or
        soft-capping.  Per layer the ring's `decode_buffers` and the global keys and values [Hkv, G, D]:
        views, made once (the buffers are filled in place, never replaced).
        """
        if not (plan.n_new == 1 and plan.step_mat is not None and plan.step_mat.shape[1] == 2 * self.head_dim
                and plan.ring_span is not None and plan.local_bias is not None and plan.evict_slots is None
                and not plan.retrieve and plan.global_new is None and not plan.window_bias):
            return None
        if self._script_rings is None:
            alike = (type(self) is LambdaCache and self.rope.scaling == 1.0 and self.softcap is None
                     and all(type(layer) is LayerCache and isinstance(layer.ring, Int8Ring)
                             and layer.device.type == "cpu" for layer in self.layers))
            self._script_rings = [[*layer.ring.decode_buffers(), layer.k_global[0], layer.v_global[0]]
                                  for layer in self.layers] if alike else []
        return self._script_rings or None

    def native_rings(self, plan: StepPlan) -> list[Tensor]:
        """script_rings(plan) flattened, six tensors a layer (native.llama_layers takes no nested lists);
        made once, like script_rings'.  Only after script_rings(plan) said the step fits."""
        if self._native_rings is None:
            self._native_rings = [t for ring in self.script_rings(plan) for t in ring]
        return self._native_rings

    def commit(self, plan: StepPlan) -> None:
        """Record that the planned tokens are now stored in every layer."""
        if plan.start != self.length:
            raise ValueError(f"a plan for stream index {plan.start} cannot be committed at {self.length}")
        self.length = plan.start + plan.n_new

    def _local_split(self, start: int, n_new: int) -> LocalSplit | None:
        """The full window's keys as unmasked ring spans plus masked edges (see LocalSplit).

        Only on the fused CPU kernel: for blocks of queries once the window is full, and for
        decode steps, which see every key of their window and so need no mask at all (the
        spans then hold the window, the new token included; attention cuts them into pieces
        for the threads).  On CUDA a captured graph replays fixed slices while these spans
        move with every block (and that path was not measured).
        """
        w, r = self.settings.n_local, self.ring_size
        if n_new == 1 and self.kv_int8:
            return None  # an int8 ring's decode step reads every slot under a mask (ring.Int8Ring.attend_one)
        if not (self.splits_local and self.fused and FLASH_CPU and self.device.type == "cpu"
                and self.softcap is None):
            return None
        if n_new == 1:
            end = start + 1
            a, m = max(0, end - w) % r, min(end, w)  # the window: positions [end - m, end)
            spans = ((a, a + m),) if a + m <= r else ((a, r), (0, a + m - r))
            none = torch.zeros(0, dtype=torch.long, device=self.device)
            return LocalSplit(spans, none, torch.zeros(self.groups, 0, dtype=self.dtype, device=self.device))
        if not (n_new >= SPLIT_MIN_ROWS and start >= w - 1 and w > n_new):
            return None
        a, m = (start + n_new - w) % r, w - n_new  # the unmasked keys: positions [start + n_new - w, start)
        spans = ((a, a + m),) if a + m <= r else ((a, r), (0, a + m - r))
        left = torch.arange(start - w + 1, start + n_new - w)   # [C - 1] oldest keys, seen by the first queries
        block = torch.arange(start, start + n_new)              # [C] the block itself, causal
        slots = (torch.cat([left, block]) % r).to(self.device)  # [2C - 1]
        i = torch.arange(n_new)[:, None]
        visible = torch.cat([torch.arange(n_new - 1)[None, :] >= i, torch.arange(n_new)[None, :] <= i], dim=1)
        return LocalSplit(spans, slots, self._bias(visible.to(self.device)))

    def _plan_middle(self, plan: StepPlan, end: int, retrieve_last: bool) -> None:
        s = self.settings
        lo, hi = self.stored_upto, end - s.n_local
        if hi > lo:
            # After this block is written the ring still holds [end - ring_size, end) ⊇ [lo, hi).
            pos = torch.arange(lo, hi)
            plan.evict_slots = (pos % self.ring_size).to(self.device)
            plan.evict_cos, plan.evict_sin = self.rope.cos_sin(-(pos - self.base), self.device, self.dtype)
            first = lo % self.ring_size
            if first + hi - lo <= self.ring_size:
                plan.evict_span = (first, first + hi - lo)
            if hi - lo == 1 and self.rope.rotary_dim:  # a decode step: one matmul instead of a rotation
                plan.evict_mat = self.rope.matrix(plan.evict_cos, plan.evict_sin)
        if retrieve_last and s.middle_top_k:
            plan.retrieve = True
            plan.ins_cos, plan.ins_sin, _ = self._ins_rotation()

    def _cap_cos_sin(self) -> tuple[Tensor, Tensor]:
        """Rotation to the distance cap L ([1, R] each); the same for every forward."""
        if self._cap is None:
            self._cap = self.rope.cos_sin(torch.tensor([self.settings.limit_distance]), self.device, self.dtype)
        return self._cap

    def _ins_rotation(self) -> tuple[Tensor, Tensor, Tensor]:
        """Rotation to the insertion distance: cos, sin ([1, R] each) and as a [D, D] matrix.

        The same for every step until set_retrieval changes the distance.
        """
        d = self.settings.middle_distance
        if self._ins is None or self._ins[0] != d:
            cos, sin = self.rope.cos_sin(torch.tensor([d]), self.device, self.dtype)
            self._ins = (d, cos, sin, self.rope.matrix(cos, sin))
        return self._ins[1:]

    def _cap_matrix(self) -> Tensor:
        if self._cap_mat is None:
            self._cap_mat = self.rope.matrix(*self._cap_cos_sin())
        return self._cap_mat

    def _bias(self, visible: Tensor) -> Tensor:
        """0 / -inf additive mask over folded query rows: [C, N] -> [g*C, N] (on visible's device).

        Filled in place through a broadcast view: the [g*C, N] result is the only mask-sized
        tensor made (a [C, N] mask repeated g times was two).
        """
        c, n = visible.shape
        bias = torch.full((self.groups, c, n), NEG_INF, dtype=self.dtype, device=visible.device)
        return bias.masked_fill_(visible, 0.0).view(self.groups * c, n)

    # -- detours: snapshot and restore -----------------------------------------
    def snapshot(self, budget: int) -> CacheSnapshot:
        """A point to come back to after appending at most `budget` tokens.

        Only the ring slots those tokens can overwrite are copied (plus the global
        buffers while the stream is shorter than n_global).  If a re-base could happen
        within the budget the whole ring is copied instead, since a re-base rotates
        every stored key.  Middle stores are only appended to, so their lengths suffice.
        """
        if budget <= 0:
            raise ValueError("a snapshot needs a positive token budget")
        rebase_possible = self.length + budget - self.base > self.rebase_every + self.ring_size
        slots = None
        if not (rebase_possible or budget >= self.ring_size):
            slots = torch.arange(self.length, self.length + budget, device=self.device) % self.ring_size
        keep_global = self.length < self.settings.n_global
        saved = []
        for layer in self.layers:
            ring = layer.ring.save(None if slots is None else slots.to(layer.device))
            glob = (layer.k_global.clone(), layer.v_global.clone()) if keep_global else None
            saved.append((ring, glob))
        middle = [layer.middle.length if layer.middle is not None else 0 for layer in self.layers]
        return CacheSnapshot(budget, self.length, self.base, self.rebases, middle, slots, saved)

    def restore(self, snap: CacheSnapshot) -> None:
        """Put buffers and counters back as they were at `snap` (bit-identical)."""
        if self.length - snap.length > snap.budget:
            raise RuntimeError(f"detour of {self.length - snap.length} tokens exceeds the snapshot budget "
                               f"{snap.budget}")
        if snap.slots is not None and self.rebases != snap.rebases:
            # Cannot happen when the budget was respected (see snapshot); a full copy undoes re-bases.
            raise RuntimeError("the cache was re-based inside a partial snapshot")
        for layer, (ring, glob), n_middle in zip(self.layers, snap.saved, snap.middle_lengths, strict=True):
            layer.ring.load(None if snap.slots is None else snap.slots.to(layer.device), ring)
            if glob is not None:
                layer.k_global.copy_(glob[0])
                layer.v_global.copy_(glob[1])
            if layer.middle is not None:
                layer.middle.truncate(n_middle)  # forget the detour's tokens (appended only, never rewritten)
        self.length, self.base, self.rebases = snap.length, snap.base, snap.rebases

    # -- state for files ------------------------------------------------------
    def meta_state(self) -> dict[str, int]:
        """The counters that, with state_dict, are the whole state of the stream."""
        return {"length": self.length, "base": self.base, "rebases": self.rebases}

    def state_dict(self) -> dict[str, Tensor]:
        """Buffers in use, on the CPU: per layer the ring and global K/V (slots written so far)
        [1, Hkv, n, D] (an int8 ring adds its scales, see ring.py), and the middle store's keys and
        values (see MiddleStore.state_dict)."""
        ring_view, global_view = min(self.length, self.ring_size), min(self.length, self.settings.n_global)
        out: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": t for k, t in layer.ring.state_dict(ring_view).items()})
            for name in ("k_global", "v_global"):
                out[f"layers.{i}.{name}"] = getattr(layer, name)[:, :, :global_view].cpu().contiguous()
            if layer.middle is not None:
                for name, t in layer.middle.state_dict().items():
                    out[f"layers.{i}.middle_{name}"] = t
        return out

    def check_meta_state(self, meta: Any) -> dict[str, int]:
        """Counters from an untrusted source, checked against each other and this cache's shape."""
        if not isinstance(meta, dict) or set(meta) != {"length", "base", "rebases"}:
            raise InputError("the cache counters must be exactly length, base and rebases")
        for key, value in meta.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 50:
                raise InputError(f"cache counter {key} must be a whole number from 0 to 2^50, got {value!r}")
        length, base, rebases = meta["length"], meta["base"], meta["rebases"]
        # What plan() guarantees: base never passes the stream's end, every re-base moves it forward,
        # and relative positions stay within rebase_every + ring_size.
        if base > length or rebases > base or (base > 0) != (rebases > 0):
            raise InputError(f"inconsistent cache counters (length {length}, base {base}, rebases {rebases})")
        if length - base > self.rebase_every + self.ring_size:
            raise InputError(f"inconsistent cache counters: {length - base} tokens past the rotation origin, "
                             f"at most {self.rebase_every + self.ring_size} can be")
        return {"length": length, "base": base, "rebases": rebases}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Any) -> None:
        """Fill this empty cache from state_dict/meta_state output, checking every shape and dtype."""
        if self.length:
            raise ValueError("load_state_dict needs an empty cache")
        counters = self.check_meta_state(meta)
        length = counters["length"]
        s = self.settings
        ring_view, global_view = min(length, self.ring_size), min(length, s.n_global)
        n_mid = max(0, length - s.n_local - s.n_global)
        expected = set()
        for i, layer in enumerate(self.layers):
            expected.update(layer.ring.load_state_dict(tensors, f"layers.{i}.", ring_view))
            for name in ("k_global", "v_global"):
                key = f"layers.{i}.{name}"
                expected.add(key)
                t = checked_tensor(tensors, key, (1, self.n_kv_heads, global_view, self.head_dim))
                if not t.is_floating_point():
                    raise InputError(f"tensor '{key}' is {t.dtype}, not floating point")
                getattr(layer, name)[:, :, :global_view] = t.to(device=layer.device, dtype=self.dtype)
            if layer.middle is not None:
                prefix = f"layers.{i}.middle_"
                names = layer.middle.load_state_dict(
                    {k.removeprefix(prefix): tensors[k] for k in tensors if k.startswith(prefix)}, n_mid)
                expected.update(prefix + n for n in names)
        extra = sorted(set(tensors) - expected)
        if extra:
            raise InputError(f"unexpected tensor '{extra[0]}' (a state for another cache layout)")
        self.length, self.base, self.rebases = length, counters["base"], counters["rebases"]


class SlidingLayerCache(LayerCache):
    """A layer with the model's own sliding window (Mistral, Gemma 2, Qwen2 ...).

    It sees the last `window` tokens at their true distances and no global
    branch, exactly as the unmodified model does.
    """

    def __init__(self, owner: LambdaCache, n_kv_heads: int, head_dim: int, device: torch.device,
                 dtype: torch.dtype, window: int) -> None:
        super().__init__(owner, n_kv_heads, head_dim, device, dtype)
        self.window = window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, plan: StepPlan) -> Tensor:
        """As LayerCache.attend, under this layer's window mask."""
        return super().attend(q, k, v, replace(plan, local_bias=plan.window_bias[self.window], global_bias=None,
                                               split=None))


class AlibiCache(LambdaCache):
    """Λ cache for ALiBi models (MPT, BLOOM): a per-head linear bias instead of rotation.

    Keys are stored as they are (nothing rotates).  The local branch gets the
    model's own bias -m_h * (i - j); the global branch gets it clipped at its value
    for distance L, -m_h * min(i - j, L) (the paper clips the offset matrix at -m_h * L).
    Both are built once per forward in `plan`.
    """

    splits_local = False

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, slopes: Tensor,
                 settings: LambdaSettings, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, scale: float | None = None, fused: bool = True) -> None:
        if settings.middle_top_k:
            raise UsageError("retrieval (middle_top_k) is not supported for ALiBi models (MPT, BLOOM) yet")
        identity = Rope(inv_freq=torch.empty(0), head_dim=head_dim, rotary_dim=0)
        super().__init__(n_layers, n_heads, n_kv_heads, head_dim, identity, settings, device, dtype,
                         scale, fused)
        self.slopes = slopes.detach().float().to(self.device)  # [H]

    def plan(self, n_new: int, retrieve_last: bool = False, *, static: bool = False) -> StepPlan:
        """The RoPE plan's slots and masks, with the linear biases added per head."""
        plan = super().plan(n_new, retrieve_last, static=static)
        idx = torch.arange(plan.start, plan.start + n_new, device=self.device)      # [C]
        kpos = self._slot_positions(plan.start + n_new, plan.ring_view)              # [N]
        local = plan.local_bias.float() + self._linear_bias(idx[:, None] - kpos[None, :])
        glob = None
        if plan.global_bias is not None:
            gdist = idx[:, None] - torch.arange(plan.global_view, device=self.device)[None, :]  # [C, G]
            glob = plan.global_bias.float() + self._linear_bias(gdist.clamp(max=self.settings.limit_distance))
        return replace(plan, local_bias=local, global_bias=glob, split=None)

    def _linear_bias(self, dist: Tensor) -> Tensor:
        """-m_h * dist over folded query rows: [C, N] -> [1, Hkv, g*C, N] (float32)."""
        c, n = dist.shape
        # Built on the device: at prefill it is H x C x N floats.
        bias = -self.slopes[:, None, None] * dist.clamp(min=0).to(self.device, torch.float32)[None]  # [H, C, N]
        return bias.view(1, self.n_kv_heads, self.groups * c, n)
