"""Recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): every weight, every layer, both directions.

Each weight multiplies one kind of row, at every valid time step of every sequence:

- ``weight_ih_l{k}`` (both directions alike): layer k's input, the module input for k = 0
  and the previous layer's concatenated outputs (both directions) above;
- ``weight_hh_l{k}{_reverse}``: the hidden state the step starts from, i.e. ``h0`` at the
  first step and the previous step's output after that (the next step's, for the reverse
  direction); with ``proj_size`` that is the projected state;
- ``weight_hr_l{k}{_reverse}`` (LSTM with ``proj_size``): the unprojected ``o * tanh(c)``.

Only the module's input is visible to a hook; the rest is computed inside it. The hook
recovers it as ``adapters/attention.py`` does for ``out_proj``: it re-runs the recurrence one
layer at a time (``torch.func.functional_call`` on a one-layer copy holding that layer's
weights), so every layer's output sequence, hence the next layer's inputs and the hidden
states each step started from, are the module's own; ``o * tanh(c)`` comes from the gates,
recomputed from those states, and the cell recursion. Padded positions of a
``PackedSequence`` are not rows. Dropout between layers would make the re-run differ, so a
multi-layer module with dropout is observed in eval mode.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from unsc_fast import ops
from unsc_fast.adapters.base import LayerAdapter, Slot, Use, check_floating, first_input


class RecurrentAdapter(LayerAdapter):
    kind = "recurrent"

    def __init__(self, name: str, module: nn.RNNBase) -> None:
        super().__init__(name, module)
        self._one_layer: dict[int, nn.RNNBase] = {}  # layer -> one-layer copy on the meta device

    # geometry -------------------------------------------------------------------
    @property
    def directions(self) -> list[str]:
        return ["", "_reverse"] if self.module.bidirectional else [""]

    @property
    def projection(self) -> int:
        return getattr(self.module, "proj_size", 0)

    @property
    def state_width(self) -> int:
        """Width of the hidden state ``weight_hh`` multiplies (the projected one, if any)."""
        return self.projection or self.module.hidden_size

    def _input_width(self, layer: int) -> int:
        return self.module.input_size if layer == 0 else len(self.directions) * self.state_width

    def _slot(self, kind: str, layer: int, direction: str = "") -> str:
        if kind == "ih":  # both directions read the same input; layer 0's slot keeps the module's name
            return self.slot_name() if layer == 0 else self.slot_name(f"ih_l{layer}")
        return self.slot_name(f"{kind}_l{layer}{direction}")

    def slots(self) -> list[Slot]:
        slots = []
        for layer in range(self.module.num_layers):
            slots.append(Slot(self._slot("ih", layer), self._input_width(layer)))
            for direction in self.directions:
                slots.append(Slot(self._slot("hh", layer, direction), self.state_width))
                if self.projection:
                    slots.append(Slot(self._slot("hr", layer, direction), self.module.hidden_size))
        return slots

    def uses(self) -> list[Use]:
        prefix, uses = f"{self.name}." if self.name else "", []
        for layer in range(self.module.num_layers):
            for direction in self.directions:
                kinds = ("ih", "hh", "hr") if self.projection else ("ih", "hh")
                for kind in kinds:
                    param = f"weight_{kind}_l{layer}{direction}"
                    uses.append(Use(getattr(self.module, param), prefix + param, self._slot(kind, layer, direction),
                                    "in", lambda t: t))
        return uses

    # inputs ---------------------------------------------------------------------------
    def _input(self, args, kwargs):
        x = first_input(args, kwargs)
        data = x.data if isinstance(x, PackedSequence) else x
        check_floating(self.name, data)
        width = self.module.input_size
        if data.dim() not in ((2,) if isinstance(x, PackedSequence) else (2, 3)) or data.shape[-1] != width:
            raise ValueError(f"layer {self.name!r}: input must end in {width}, got {tuple(data.shape)}")
        return x

    def batch_size(self, args, kwargs) -> int:
        x = self._input(args, kwargs)
        if isinstance(x, PackedSequence):
            return int(x.batch_sizes[0])
        if x.dim() == 2:
            return 1
        return x.shape[0] if self.module.batch_first else x.shape[1]

    def _sequences(self, args, kwargs):
        """``(x (B, T, F) batch first, lengths (B,), h0, c0)``; h0/c0 ``(layers * dirs, B, .)``
        or None, in the order of the labels (a packed batch's original order)."""
        x = self._input(args, kwargs)
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        unbatched = not isinstance(x, PackedSequence) and x.dim() == 2
        if isinstance(x, PackedSequence):
            x, lengths = pad_packed_sequence(x, batch_first=True)
        else:
            x = x.unsqueeze(0) if unbatched else (x if self.module.batch_first else x.transpose(0, 1))
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
        if unbatched:
            h0, c0 = (None if s is None else s.unsqueeze(1) for s in (h0, c0))
        return x.detach(), lengths, _detached(h0), _detached(c0)

    # the hook's work ----------------------------------------------------------------------
    def accumulate_(self, deltas, args, kwargs, output, index) -> dict[str, int]:
        rows = {}
        for name, _, part in self.input_rows(args, kwargs, output, index):
            self._add(deltas, rows, name, part)
        return rows

    def input_rows(self, args, kwargs, output, index):
        """Every slot's rows, layer by layer (each layer's input, each direction's previous
        states, and an LSTM projection's cell outputs), at the valid steps only: what
        ``accumulate_`` adds and what a sketch consumes."""
        m = self.module
        if m.training and m.dropout > 0 and m.num_layers > 1:
            raise ValueError(
                f"layer {self.name!r}: {type(m).__name__} with dropout={m.dropout} between layers must be observed "
                "in eval mode (dropout would change the inputs of its higher layers); use model.eval() or "
                "projector.collect()"
            )
        x, lengths, h0, c0 = self._sequences(args, kwargs)
        if index is not None:  # sequences are independent: run only the chosen ones
            x, lengths = x.index_select(0, index.to(x.device)), lengths.index_select(0, index.cpu())
            h0, c0 = (None if s is None else s.index_select(1, index.to(s.device)) for s in (h0, c0))
        steps = torch.arange(x.shape[1], device=x.device)
        valid = steps[None, :] < lengths.to(x.device)[:, None]  # (B, T)
        layer_input = x
        for layer in range(m.num_layers):
            yield self._slot("ih", layer), None, layer_input[valid]
            states = self._states(layer, h0, c0, x.shape[0], x)
            outputs = self._run_layer(layer, layer_input, lengths, states)
            for d, direction in enumerate(self.directions):
                h_start, c_start = states[0][d], None if states[1] is None else states[1][d]
                own = outputs[..., d * self.state_width:(d + 1) * self.state_width]
                previous = _previous_states(own, h_start, lengths, reverse=bool(direction))
                yield self._slot("hh", layer, direction), None, previous[valid]
                if self.projection:
                    cell = self._cell_outputs(layer, direction, layer_input, previous, c_start, lengths)
                    yield self._slot("hr", layer, direction), None, cell[valid]
            layer_input = outputs

    @staticmethod
    def _add(deltas, rows, name, part) -> None:
        ops.covariance_(deltas[name], part)
        rows[name] = part.shape[0]

    def _states(self, layer, h0, c0, batch, like):
        """Layer ``layer``'s initial (h, c), one entry per direction (zeros when not given)."""
        D = len(self.directions)
        def pick(state, width):
            if state is None:
                return like.new_zeros((D, batch, width))
            return state[layer * D:(layer + 1) * D].to(like.dtype)
        h = pick(h0, self.state_width)
        c = pick(c0, self.module.hidden_size) if isinstance(self.module, nn.LSTM) else None
        return h, c

    def _run_layer(self, layer, layer_input, lengths, states) -> torch.Tensor:
        """Layer ``layer``'s output sequence ``(B, T, dirs * width)``, zeros past each length."""
        single = self._single(layer)
        params = {name: getattr(self.module, name.replace("_l0", f"_l{layer}")) for name, _ in single.named_parameters()}
        hx = states if isinstance(self.module, nn.LSTM) else states[0]
        full = bool((lengths == layer_input.shape[1]).all())
        source = layer_input if full else pack_padded_sequence(layer_input, lengths, batch_first=True,
                                                               enforce_sorted=False)
        with torch.no_grad():
            result = torch.func.functional_call(single, params, (source, hx))[0]
        return result if full else pad_packed_sequence(result, batch_first=True, total_length=layer_input.shape[1])[0]

    def _single(self, layer: int) -> nn.RNNBase:
        if layer not in self._one_layer:
            m = self.module
            options = dict(input_size=self._input_width(layer), hidden_size=m.hidden_size, num_layers=1, bias=m.bias,
                           batch_first=True, bidirectional=m.bidirectional)
            cls = _base_class(m)
            if cls is nn.LSTM:
                options["proj_size"] = m.proj_size
            if cls is nn.RNN:
                options["nonlinearity"] = m.nonlinearity
            with torch.device("meta"):  # holds no weights: functional_call lends it the module's
                self._one_layer[layer] = cls(**options)
        return self._one_layer[layer]

    def _cell_outputs(self, layer, direction, layer_input, previous, c_start, lengths) -> torch.Tensor:
        """LSTM with ``proj_size``: ``o * tanh(c)`` at every step, from the gates (each step's
        input and starting state are known) and the cell recursion ``c = f c' + i g``."""
        m, suffix = self.module, f"_l{layer}{direction}"
        gates = layer_input @ getattr(m, "weight_ih" + suffix).T + previous @ getattr(m, "weight_hh" + suffix).T
        if m.bias:
            gates = gates + getattr(m, "bias_ih" + suffix) + getattr(m, "bias_hh" + suffix)
        i, f, g, o = gates.detach().chunk(4, dim=-1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        T, outputs, c = layer_input.shape[1], torch.empty_like(i), c_start
        order = range(T - 1, -1, -1) if direction else range(T)
        ends = lengths.to(layer_input.device)[:, None]
        for t in order:
            if direction:  # the reverse direction of each sequence starts at its last valid step
                c = torch.where(t + 1 < ends, c, c_start)
            c = f[:, t] * c + i[:, t] * g[:, t]
            outputs[:, t] = o[:, t] * c.tanh()
        return outputs


def _base_class(module: nn.Module) -> type:
    return next(c for c in type(module).__mro__ if c in (nn.RNN, nn.LSTM, nn.GRU))


def _previous_states(outputs: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The state each step starts from: ``start`` at a direction's first step, else the
    neighbouring step's output (the previous one forward, the next one in reverse)."""
    B, T, _ = outputs.shape
    if not reverse:
        return torch.cat([start[:, None], outputs[:, :-1]], dim=1)
    shifted = torch.cat([outputs[:, 1:], outputs.new_zeros((B, 1, outputs.shape[-1]))], dim=1)
    steps = torch.arange(T, device=outputs.device)
    last = (steps[None, :] + 1 >= lengths.to(outputs.device)[:, None])[..., None]
    return torch.where(last, start[:, None], shifted)


def _detached(state):
    return None if state is None else state.detach()


RecurrentInputAdapter = RecurrentAdapter  # the earlier name (it tracked the first layer's input weights only)
