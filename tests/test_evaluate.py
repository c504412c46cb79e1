"""`vitidle.evaluate` and `vitidle eval`: micro-averaged top-1 / top-5 that agree with the finetune's own numbers."""

import json

import pytest
import torch
from conftest import summary
from test_cli import assert_one_error_line, run

from vitidle.evaluate import accuracy


class FixedLogits(torch.nn.Module):
    """Returns the logits it was given, one row per image, whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.next = logits, 0

    def forward(self, x):
        out = self.logits[self.next : self.next + len(x)]
        self.next += len(x)
        return out


def test_accuracy_is_the_micro_average_over_images():
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5], [0, 9, 8, 7, 6, 5], [0, 1, 2, 3, 4, 9]])
    labels = torch.tensor([0, 0, 4])  # a hit; the smallest logit: a top-5 miss; the second: a top-5 hit only
    batches = [(torch.zeros(2, 1), labels[:2]), (torch.zeros(1, 1), labels[2:])]  # batches of unequal size
    top1, top5, seen = accuracy(FixedLogits(logits), batches)
    assert (top1, top5, seen) == (pytest.approx(100 / 3), pytest.approx(200 / 3), 3)


def test_eval_dense_reads_the_same_weights_without_idling(capsys, idle_run, folder):
    out, _ = idle_run
    idle = json.loads(run(capsys, "eval", out, "--data", folder, "--json", "--workers", "0")[1])
    code, stdout, err = run(capsys, "eval", out, "--data", folder, "--json", "--workers", "0", "--dense")
    assert code == 0, err
    dense = json.loads(stdout)
    assert dense["weights"] == "dense" and dense["images"] == idle["images"] == 16
    assert dense["gmacs"] > idle["gmacs"]
    assert idle["top1"] == pytest.approx(float(summary(out)[-1]["top1"]), abs=1e-3)


def test_eval_prints_a_table(capsys, idle_run, folder):
    out, _ = idle_run
    code, stdout, err = run(capsys, "eval", out, "--data", folder, "--workers", "0", "--limit", "5")
    assert code == 0, err
    rows = dict(line.split(None, 1) for line in stdout.splitlines())
    assert rows["data"].endswith("(validation, 5 images)") and rows["top-1"].endswith("%")


@pytest.mark.parametrize("args, text", [(["--data", "nope/imgs"], "does not exist"),
                                        (["--data", "fashion_mnist", "--root", "nope"], "dataset-fashion-mnist")])
def test_eval_bad_data_is_one_line(capsys, idle_run, args, text):
    out, _ = idle_run
    code, _, err = run(capsys, "eval", out, *args)
    assert code == 2
    assert_one_error_line(err)
    assert text in err
