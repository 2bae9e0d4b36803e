"""LSTM / GRU classifiers for sequential MNIST read row by row (SNIP, Lee et al. ICLR 2019, §5.3).

SNIP: "one layer RNN networks with either LSTM (Zaremba et al. 2014) or GRU (Cho et al. 2014) cells",
128 (-s) or 256 (-b) units, the cell receives one 28-pixel row per step (after Le et al. 2015).
The SNIP code for these is not public; the classifier reads the last step's hidden state.

Parameter counts (10 classes): LSTM 82,186 (128) / 295,434 (256); GRU 61,962 / 222,218. SNIP's
Table 2 reports 137k / 536k / 104k / 404k, which matches an extra input projection 28->hidden before
the cell; `embed=True` adds it (137,098 / 536,330 / 104,074 / 404,746; PyTorch keeps two bias vectors
per gate where TensorFlow keeps one, hence +4H / +3H). This reading of the paper is a reconstruction.
"""

from __future__ import annotations

from torch import nn

from .registry import check_bool, check_int, register

ROWS = COLS = 28


class RowRNN(nn.Module):
    """(N, 1, 28, 28) -> 28 steps of 28 features -> [embed] -> rnn -> fc on the last step."""

    def __init__(self, cell: str = "lstm", hidden: int = 128, num_classes: int = 10, embed: bool = False):
        super().__init__()
        self.rows = nn.Flatten(1, 2)  # (N, 1, 28, 28) -> (N, 28 steps, 28 features)
        self.embed = nn.Linear(COLS, hidden) if embed else None
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(hidden if embed else COLS, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.rows(x)
        if self.embed is not None:
            x = self.embed(x)
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def _builder(cell):
    def build(num_classes, hidden=128, embed=False):
        return RowRNN(cell, check_int("hidden", hidden, low=1), num_classes, check_bool("embed", embed))
    return build


_OPTIONS = {
    "hidden": "hidden units of the cell; SNIP uses 128 (-s) and 256 (-b) (default 128)",
    "embed": "linear projection 28->hidden before the cell, matching SNIP's reported counts (default False)",
}
register("lstm", "single-layer LSTM on MNIST rows (sequential MNIST, SNIP)", "mnist", (1, 28, 28),
         _builder("lstm"), _OPTIONS)
register("gru", "single-layer GRU on MNIST rows (sequential MNIST, SNIP)", "mnist", (1, 28, 28),
         _builder("gru"), _OPTIONS)
