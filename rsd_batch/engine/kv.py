"""Per-sequence KV caches, gathered into one batch for a forward and split back afterwards.

Each sequence keeps its own cache per model (`RowKV`: keys and values of the tokens that model has
processed, no padding). A batched forward gathers the rows into a left-padded Hugging Face cache,
feeds each row only its *new* tokens (a chunk: the prompt, the other model's step, or its own last
token), and rows leave the batch as they finish, each taking its cache back. So no model ever
re-processes a prefix, finished rows cost nothing, and a new problem can join between rounds.

Layout inside a batch, per row:  [pad … cached tokens | pad … chunk tokens | decoded tokens …]
The attention mask hides the pads; position ids count only real tokens.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
import torch


@dataclass
class RowKV:
    """One sequence's cache for one model: per layer (keys, values), each [kv_heads, length, head_dim]."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    length: int = 0

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (a rejected step)."""
        if length < self.length:
            self.layers = [(k[:, :length], v[:, :length]) for k, v in self.layers]
            self.length = length

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def copy(self) -> "RowKV":
        """A copy sharing the tensors (they are never changed in place)."""
        return RowKV(list(self.layers), self.length)


def _growing_layer_class():
    """A cache layer that writes new tokens into spare room instead of concatenating.

    Hugging Face's DynamicLayer concatenates on every token, copying the whole cache each time; this
    one doubles its buffer when full, so a decode step copies only the new token's keys and values.
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers < 4.56: plain concatenating caches
        return None

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states) -> None:
            super().lazy_initialization(key_states, value_states)
            self.buf_k = self.buf_v = None
            self.used = 0
            self.n = key_states.shape[0]  # live rows: the first n of the buffer

        @classmethod
        def holding(cls, buf_k, buf_v, used: int) -> "GrowingLayer":
            """A layer whose buffers the caller has filled up to `used` (KVBatch gathers the rows'
            caches straight into them: no second copy)."""
            layer = cls()
            layer.device, layer.is_initialized = buf_k.device, True
            layer.buf_k, layer.buf_v, layer.used, layer.n = buf_k, buf_v, used, buf_k.shape[0]
            layer._views()
            return layer

        def _views(self) -> None:
            self.keys = self.buf_k[: self.n, ..., : self.used, :]
            self.values = self.buf_v[: self.n, ..., : self.used, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            if self.buf_k is None or self.used + new > self.buf_k.shape[-2]:
                cap = max(2 * (self.used + new), 64)
                shape = (self.n, *key_states.shape[1:-2], cap, key_states.shape[-1])
                buf_k, buf_v = key_states.new_empty(shape), value_states.new_empty(shape)
                if self.used:
                    buf_k[..., : self.used, :] = self.buf_k[: self.n, ..., : self.used, :]
                    buf_v[..., : self.used, :] = self.buf_v[: self.n, ..., : self.used, :]
                self.buf_k, self.buf_v = buf_k, buf_v
            self.buf_k[: self.n, ..., self.used: self.used + new, :] = key_states
            self.buf_v[: self.n, ..., self.used: self.used + new, :] = value_states
            self.used += new
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            """Keep rows `indices` (in that order). When every row that moves comes from past the
            new end (KVBatch.keep's fill-the-holes order), move just those rows and shrink the view:
            a leaving row then costs one row's copy, not the whole batch's."""
            if self.buf_k is None:
                return
            order = indices.tolist()
            n = len(order)
            moves = [(j, i) for j, i in enumerate(order) if i != j]
            if all(i >= n for _, i in moves):
                for j, i in moves:
                    self.buf_k[j, ..., : self.used, :] = self.buf_k[i, ..., : self.used, :]
                    self.buf_v[j, ..., : self.used, :] = self.buf_v[i, ..., : self.used, :]
            else:
                self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
            self.n = n
            self._views()

    return GrowingLayer


_GROWING = _growing_layer_class()


def cache_kwarg(model) -> str:
    """transformers 5.2x renames `past_key_values` to `cache`; 4.x knows only the old name."""
    fn = model.forward
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def own_mask(module) -> bool:
    """Whether a decode step may hand the model its 4D mask itself ([rows, 1, 1, length] booleans)
    instead of letting transformers build one every forward (0.2 ms: a tenth of the toy draft's
    step): with SDPA, full attention in every layer (a sliding window needs transformers' masks),
    and a transformers that takes a 4D mask as it is (>= 4.56, as the growing layers)."""
    cfg = getattr(module, "config", None)
    return (_GROWING is not None and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])))


def _layer(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def _num_layers(cache) -> int:
    return len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)


class KVBatch:
    """A batch of rows sharing one padded cache for the length of a decode phase."""

    def __init__(self, module, device, pad_id: int, rows: list[RowKV], chunks: list[list[int]]):
        from transformers import DynamicCache

        assert all(chunks), "every row needs at least one new token"
        self.module, self.device, self.pad_id = module, device, pad_id
        self.kw = cache_kwarg(module)
        self.own_mask = own_mask(module)
        n = len(rows)
        past = max(r.length for r in rows)
        width = max(len(c) for c in chunks)
        self.cache = DynamicCache()
        growing = _GROWING is not None and hasattr(self.cache, "layer_class_to_replicate") and not self.cache.layers
        if growing:
            self.cache.layer_class_to_replicate = _GROWING
        if past:
            n_layers = max(len(r.layers) for r in rows if r.length)
            # Growing layers get the rows gathered straight into their buffers, with the room a
            # GrowingLayer would leave (the chunk and the decode after it); pads are zeros.
            room = max(2 * (past + width), 64) if growing else past
            for li in range(n_layers):
                ref_k, ref_v = next(r.layers[li] for r in rows if r.length)
                ks = ref_k.new_empty((n, ref_k.shape[0], room, ref_k.shape[2]))
                vs = ref_v.new_empty((n, ref_v.shape[0], room, ref_v.shape[2]))
                for b, r in enumerate(rows):
                    ks[b, :, : past - r.length] = 0
                    vs[b, :, : past - r.length] = 0
                    if r.length:
                        k, v = r.layers[li]
                        ks[b, :, past - r.length: past] = k
                        vs[b, :, past - r.length: past] = v
                if growing:
                    self.cache.layers.append(_GROWING.holding(ks, vs, past))
                else:
                    self.cache.update(ks, vs, li)
        mask = torch.zeros((n, past + width), dtype=torch.long)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        for b, (r, c) in enumerate(zip(rows, chunks)):
            mask[b, past - r.length:past] = 1
            mask[b, past + width - len(c):] = 1
            ids[b, width - len(c):] = torch.tensor(c, dtype=torch.long)
            pos[b, width - len(c):] = torch.arange(r.length, r.length + len(c))
        # Where each row's real tokens lie: [past - length, past) and [chunk_start, end).
        self.spans = [(past - r.length, past, past + width - len(c)) for r, c in zip(rows, chunks)]
        self.mask = mask.to(device)
        self.ids = ids.to(device)
        self.pos = pos.to(device)
        self.width = width
        self.next_pos = self.pos[:, -1] + 1
        self.rows = list(range(n))  # batch position -> caller's row index

    def forward_chunk(self, **kw):
        """Run the chunks; returns the model output (logits or hidden states per `kw`)."""
        return self.module(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                           use_cache=True, **{self.kw: self.cache}, **kw)

    def forward_next(self, tokens: list[int], **kw):
        """Feed one token per row still in the batch."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=-1)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        mask = self.mask[:, None, None, :].bool() if self.own_mask else self.mask
        out = self.module(input_ids=ids, attention_mask=mask, position_ids=self.next_pos[:, None],
                          use_cache=True, **{self.kw: self.cache}, **kw)
        self.next_pos = self.next_pos + 1
        return out

    def extract(self, b: int) -> RowKV:
        """The cache of batch position `b`, without padding (two slices: no mask gather)."""
        cached_from, past, chunk_from = self.spans[b]
        layers = []
        for li in range(_num_layers(self.cache)):
            k, v = _layer(self.cache, li)
            layers.append((torch.cat([k[b, :, cached_from:past], k[b, :, chunk_from:]], dim=1),
                           torch.cat([v[b, :, cached_from:past], v[b, :, chunk_from:]], dim=1)))
        length = layers[0][0].shape[1] if layers else 0
        return RowKV(layers, length)

    def nbytes(self) -> int:
        """Bytes the batch's cache holds, spare room included."""
        total = 0
        for layer in getattr(self.cache, "layers", []):
            k = getattr(layer, "buf_k", None)
            if k is not None:
                total += k.nbytes + layer.buf_v.nbytes
            elif getattr(layer, "keys", None) is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def keep(self, positions: list[int]) -> list[int]:
        """Keep only these batch positions (others have finished and taken their caches). The rows
        past the new end fill the holes, so the cache moves only them; returns the kept positions in
        their new order (what the caller feeds next follows it)."""
        if len(positions) == len(self.rows):
            return positions
        n = len(positions)
        holes = iter(sorted(set(range(n)) - set(positions)))
        order = list(range(n))
        for p in positions:
            if p >= n:
                order[next(holes)] = p
        index = torch.tensor(order, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.next_pos = self.next_pos[index]
        self.rows = [self.rows[p] for p in order]
        self.spans = [self.spans[p] for p in order]
        return order
