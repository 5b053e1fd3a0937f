"""Two-dimensional LSTM layers of PixelRNN (van den Oord, Kalchbrenner and Kavukcuoglu, 2016).

Reference: A. van den Oord, N. Kalchbrenner, K. Kavukcuoglu, "Pixel Recurrent Neural
Networks", ICML 2016, https://arxiv.org/abs/1601.06759 (section 3.1 Row LSTM, 3.2 Diagonal
BiLSTM).

Both layers split the LSTM update into an *input-to-state* part, a masked convolution over
the whole input map computed once (vectorised over all positions), and a *state-to-state*
part, a small convolution of the previous hidden state computed inside a loop:

* [`RowLSTM`][discretelik.nn.recurrent.RowLSTM] loops over the ``H`` rows; the state-to-state
  kernel is a 1D convolution of width ``k`` over the previous row, which gives the triangular
  receptive field of the paper (each row further up is one pixel wider on each side).
* [`DiagonalBiLSTM`][discretelik.nn.recurrent.DiagonalBiLSTM] skews the map (row ``r``
  shifted right by ``r``, see [`skew`][discretelik.nn.recurrent.skew]) so that each diagonal of
  the image becomes a column, and loops over the ``W + H - 1`` columns with a 2x1
  state-to-state kernel: pixel ``(i, j)`` reads the states of ``(i - 1, j)`` (above) and
  ``(i, j - 1)`` (left), so its context is the whole quadrant above-left. The second
  direction runs on the horizontally flipped map (the quadrant above-right) and is shifted
  down one row before the two are summed, so that it only brings in rows strictly above.

Gate layout and colour groups: the ``4 * hidden`` pre-activations are ``groups`` contiguous
blocks (R, G, B when ``groups=3``), each holding the gates ``(i, f, o, g)`` of its
``hidden // groups`` units, and the hidden state is ``groups`` contiguous blocks likewise.
The input-to-state convolution is a
[`MaskedConv2d`][discretelik.nn.masked_conv.MaskedConv2d] of type B with the same groups, and
each group's gates are computed from that group's pre-activations only, so hidden block ``c``
at a pixel sees input blocks ``<= c`` of that pixel. The state-to-state kernels are not
masked: in both layers they only read states of strictly earlier pixels (previous row; left
and above; the shifted right-to-left direction sees rows above only), which may carry every
colour of those pixels.

Departures from the paper: equation 3 of the paper applies the sigmoid to all four gates;
here the content gate ``g`` uses ``tanh``, as in the standard LSTM. The forget-gate bias
starts at 1 (a common LSTM initialisation that the paper does not state). The left-to-right
and right-to-left directions of the Diagonal BiLSTM have separate weights and run in the same
column loop (one batched matrix product per step), so a layer takes ``W + H - 1`` steps, not
twice that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .masked_conv import MaskedConv2d

__all__ = ["RowLSTM", "DiagonalBiLSTM", "lstm_update", "skew", "unskew"]

#: Order of the four gates inside each colour group's block of pre-activations.
GATES = ("i", "f", "o", "g")


def skew(x: Tensor) -> Tensor:
    """Shift row ``r`` of a map right by ``r`` positions, padding with zeros.

    Args:
        x: float ``(B, C, H, W)``.

    Returns:
        ``(B, C, H, W + H - 1)`` with ``out[..., r, r + j] = x[..., r, j]`` and zeros elsewhere.
    """
    b, c, h, w = x.shape
    # Rows of width W + H laid end to end put x[r, j] at flat index r * (W + H) + j, which is
    # exactly where out[r, r + j] sits in a (H, W + H - 1) array: drop the last H - 1 zeros
    # of the flattened padded map and reshape.
    flat = F.pad(x, (0, h)).reshape(b, c, h * (w + h))
    return flat[..., : h * (w + h - 1)].reshape(b, c, h, w + h - 1)


def unskew(x: Tensor, width: int) -> Tensor:
    """Inverse of [`skew`][discretelik.nn.recurrent.skew].

    Args:
        x: float ``(B, C, H, width + H - 1)``.
        width: The original width ``W``.

    Returns:
        ``(B, C, H, W)`` with ``out[..., r, j] = x[..., r, r + j]``.
    """
    b, c, h, _ = x.shape
    flat = F.pad(x.reshape(b, c, h * (width + h - 1)), (0, h))  # (B, C, H * (W + H))
    return flat.reshape(b, c, h, width + h)[..., :width]


def lstm_update(pre: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step from pre-activations laid out as ``(B, N, 4, U, L)``.

    Args:
        pre: float ``(B, N, 4, U, L)``: ``N`` independent blocks (directions x colour groups),
            the gates in the order of ``GATES``, ``U`` units per block, ``L`` positions.
        cell: float ``(B, N, U, L)``, the previous cell state.

    Returns:
        ``(hidden, cell)``, both ``(B, N, U, L)``.
    """
    i, f, o = torch.sigmoid(pre[:, :, :3]).unbind(2)
    g = torch.tanh(pre[:, :, 3])
    cell = f * cell + i * g
    return o * torch.tanh(cell), cell


class RowLSTM(nn.Module):
    """The Row LSTM layer: processes the image row by row, top to bottom.

    Args:
        in_channels: Input feature channels; a multiple of ``groups``.
        hidden_channels: LSTM units ``h``; a multiple of ``groups``.
        kernel_size: Odd width ``k`` of both the input-to-state kernel (``1 x k``, mask B: the
            left half of the row and the centre pixel) and the state-to-state kernel (``k``
            positions of the previous row).
        groups: Colour groups of the mask-B input-to-state convolution.

    Shapes:
        ``x (B, in_channels, H, W) -> h (B, hidden_channels, H, W)``; optional ``gate_bias``
        ``(B, 4 * hidden_channels)`` is added to the pre-activations at every position.
    """

    def __init__(
        self, in_channels: int, hidden_channels: int, kernel_size: int = 3, groups: int = 1
    ) -> None:
        super().__init__()
        check_int(kernel_size, "kernel_size", 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        _check_groups(hidden_channels, groups)
        self.hidden_channels = hidden_channels
        self.groups = groups
        self.input_to_state = MaskedConv2d(
            in_channels, 4 * hidden_channels, (1, kernel_size), "B", groups=groups
        )
        # Reads only the previous row, all of which lies before the current pixel: no mask.
        self.state_to_state = nn.Conv1d(
            hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        _init_forget_bias(self.input_to_state.bias, groups)

    def step(self, pre_row: Tensor, hidden: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        """One row: ``pre_row (B, 4h, W)`` input-to-state, ``hidden``/``cell`` ``(B, G, U, W)``."""
        b, _, width = pre_row.shape
        pre = pre_row + self.state_to_state(hidden.reshape(b, self.hidden_channels, width))
        # Explicit sizes, not -1: a view of an empty batch (B = 0) cannot infer a dimension.
        units = self.hidden_channels // self.groups
        return lstm_update(pre.view(b, self.groups, 4, units, width), cell)

    def forward(self, x: Tensor, gate_bias: Tensor | None = None) -> Tensor:
        b, _, height, width = x.shape
        pre = self.input_to_state(x)  # (B, 4h, H, W): every row at once
        if gate_bias is not None:
            pre = pre + gate_bias[:, :, None, None]
        units = self.hidden_channels // self.groups
        hidden = x.new_zeros(b, self.groups, units, width)
        cell = torch.zeros_like(hidden)
        rows = []
        # unbind, not pre[:, :, i]: indexing in a loop makes autograd build a full-size
        # zero gradient per step (quadratic in H); unbind's backward is one stack.
        # Rows first and contiguous, so each step reads one contiguous block.
        for pre_row in pre.movedim(2, 0).contiguous().unbind(0):
            hidden, cell = self.step(pre_row, hidden, cell)
            rows.append(hidden)
        out = torch.stack(rows).view(height, b, self.hidden_channels, width)  # (H, B, h, W)
        return out.movedim(0, 2)


class DiagonalBiLSTM(nn.Module):
    """The Diagonal BiLSTM layer: two diagonal LSTMs (left-to-right and right-to-left), summed.

    Args:
        in_channels: Input feature channels; a multiple of ``groups``.
        hidden_channels: LSTM units ``h`` per direction; a multiple of ``groups``.
        groups: Colour groups of the 1x1 mask-B input-to-state convolutions.

    Shapes:
        ``x (B, in_channels, H, W) -> h (B, hidden_channels, H, W)``; optional ``gate_bias``
        ``(B, 4 * hidden_channels)`` is added to both directions' pre-activations.
    """

    def __init__(self, in_channels: int, hidden_channels: int, groups: int = 1) -> None:
        super().__init__()
        _check_groups(hidden_channels, groups)
        self.hidden_channels = hidden_channels
        self.groups = groups
        # One 1x1 input-to-state convolution per direction (index 0: left-to-right).
        self.input_to_state = nn.ModuleList(
            MaskedConv2d(in_channels, 4 * hidden_channels, 1, "B", groups=groups) for _ in range(2)
        )
        # The 2x1 state-to-state kernel along a skewed column, per direction: columns [:h] act
        # on row r - 1 of the previous column (the pixel above), columns [h:] on row r (the
        # pixel to the left). One batched matmul over both directions is faster on CPU than
        # the equivalent grouped Conv1d; initialised like that Conv1d (fan-in 2h).
        weight = torch.empty(2, 4 * hidden_channels, 2 * hidden_channels)
        self.state_to_state = nn.Parameter(weight)
        bound = (2 * hidden_channels) ** -0.5
        nn.init.uniform_(self.state_to_state, -bound, bound)
        for conv in self.input_to_state:
            _init_forget_bias(conv.bias, groups)

    def step(self, pre_col: Tensor, hidden: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        """One skewed column: ``pre_col (B, 8h, H)``, ``hidden``/``cell`` ``(B, 2G, U, H)``."""
        b, _, height = pre_col.shape
        left = hidden.reshape(b, 2, self.hidden_channels, height)  # (B, direction, h, H)
        # Row r - 1 moved to row r; a zero row on top: the first row has no pixel above it.
        above = F.pad(left, (1, -1))
        state = torch.matmul(self.state_to_state, torch.cat([above, left], dim=2))  # (B, 2, 4h, H)
        # Explicit sizes, not -1: a view of an empty batch (B = 0) cannot infer a dimension.
        pre = pre_col + state.view(b, 8 * self.hidden_channels, height)
        units = self.hidden_channels // self.groups
        return lstm_update(pre.view(b, 2 * self.groups, 4, units, height), cell)

    def forward(self, x: Tensor, gate_bias: Tensor | None = None) -> Tensor:
        b, _, height, width = x.shape
        h = self.hidden_channels
        left = self.input_to_state[0](x)
        # A 1x1 convolution commutes with the flip, so flipping its output is the same as
        # running the right-to-left direction on the flipped input.
        right = self.input_to_state[1](x).flip(-1)
        pre = torch.cat([left, right], dim=1)  # (B, 8h, H, W): (direction, group, gate, unit)
        if gate_bias is not None:
            pre = pre + gate_bias.repeat(1, 2)[:, :, None, None]
        # Skewed after the biases are in, so the padding's pre-activations are exactly 0 and
        # the states left of the image stay 0: the first pixel of a row starts from zero
        # state, as in the unskewed recurrence.
        pre = skew(pre)  # (B, 8h, H, W + H - 1)
        hidden = x.new_zeros(b, 2 * self.groups, h // self.groups, height)
        cell = torch.zeros_like(hidden)
        cols = []
        # One step per skewed column, W + H - 1 in all (unbind: see RowLSTM.forward).
        # Columns first and contiguous, so each step reads one contiguous block.
        for pre_col in pre.movedim(-1, 0).contiguous().unbind(0):
            hidden, cell = self.step(pre_col, hidden, cell)
            cols.append(hidden)
        out = torch.stack(cols).view(len(cols), b, 2 * h, height)  # (W + H - 1, B, 2h, H)
        out = unskew(out.movedim(0, -1), width)
        left, right = out[:, :h], out[:, h:].flip(-1)
        # Right-to-left state at (i, j) has seen (i, j + 1), (i, j + 2), ...: a later pixel.
        # One row down it only covers rows above the pixel it is added to.
        right = F.pad(right, (0, 0, 1, 0))[:, :, :height]
        return left + right


def _check_groups(hidden_channels: int, groups: int) -> None:
    check_int(hidden_channels, "hidden_channels", 1)
    check_int(groups, "groups", 1)
    if hidden_channels % groups:
        raise ValueError(
            f"hidden_channels ({hidden_channels}) must be a multiple of the colour groups "
            f"({groups})"
        )


def _init_forget_bias(bias: Tensor | None, groups: int) -> None:
    """Start the forget gates at bias 1 (remember by default); ``bias`` is ``(G * 4 * U,)``."""
    if bias is not None:
        with torch.no_grad():
            bias.view(groups, 4, -1)[:, GATES.index("f")] = 1.0
