"""The idle plan: IdleViT's schedule, K per block, the --plan syntax and its errors."""

import math

import pytest

from vitidle.engine.plan import IdlePlan, check_keep, make_plan
from vitidle.errors import UsageError


def stages(plan: IdlePlan) -> list[tuple[float | None, int]]:
    """Run-length encode a plan's ratios: [(ratio, how many blocks in a row)]."""
    runs: list[list] = []
    for k in plan.keep:
        if runs and (runs[-1][0] == k or (k is not None and runs[-1][0] is not None and math.isclose(runs[-1][0], k))):
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    return [tuple(r) for r in runs]


def test_idlevit_depth_12_is_the_papers_plan():
    plan = IdlePlan.idlevit(12, 0.7)
    assert len(plan.keep) == 12
    assert plan.keep[:3] == (None, None, None)
    assert plan.keep[3:6] == pytest.approx([0.7] * 3)
    assert plan.keep[6:9] == pytest.approx([0.49] * 3)
    assert plan.keep[9:] == pytest.approx([0.343] * 3)


def test_idlevit_num_keep_at_0_7_and_0_5():
    assert IdlePlan.idlevit(12, 0.7).num_keep(196) == [None] * 3 + [137] * 3 + [96] * 3 + [67] * 3
    # 196 * 0.125 = 24.5: K rounds down
    assert IdlePlan.idlevit(12, 0.5).num_keep(196) == [None] * 3 + [98] * 3 + [49] * 3 + [24] * 3


@pytest.mark.parametrize("depth, dense, stage", [(4, 1, 1), (12, 3, 3), (16, 4, 4), (20, 5, 5), (24, 6, 6)])
def test_idlevit_first_quarter_dense_then_three_equal_stages(depth, dense, stage):
    r = 0.6
    plan = IdlePlan.idlevit(depth, r)
    assert stages(plan) == [(None, dense), (pytest.approx(r), stage), (pytest.approx(r**2), stage),
                            (pytest.approx(r**3), stage)]


def test_idlevit_remainder_goes_to_earlier_stages():
    # depth 13: 3 dense, 10 idle -> 4, 3, 3
    plan = IdlePlan.idlevit(13, 0.5)
    assert [n for _, n in stages(plan)] == [3, 4, 3, 3]
    assert plan.keep[3:7] == (0.5,) * 4


def test_keep_one_plan_keeps_every_image_token():
    assert IdlePlan.idlevit(12, 1.0).num_keep(196) == [None] * 3 + [196] * 9


def test_num_keep_is_at_least_one():
    assert IdlePlan((None, 0.001)).num_keep(196) == [None, 1]


def test_constant_schedule():
    plan = IdlePlan.constant(12, 0.7)
    assert plan.keep == (None,) * 3 + (0.7,) * 9
    assert plan.num_keep(196) == [None] * 3 + [137] * 9
    assert IdlePlan.constant(4, 0.5).keep == (None, 0.5, 0.5, 0.5)


def test_parse_the_idlevit_plan_written_out():
    plan = IdlePlan.parse("3-5:0.7,6-8:0.49,9-11:0.343", depth=12)
    assert plan.keep == (None,) * 3 + (0.7,) * 3 + (0.49,) * 3 + (0.343,) * 3
    assert plan.num_keep(196) == IdlePlan.idlevit(12, 0.7).num_keep(196)


def test_parse_single_entries_and_spaces():
    assert IdlePlan.parse("2:0.5", depth=4).keep == (None, None, 0.5, None)
    assert IdlePlan.parse("0:1", depth=2).keep == (1.0, None)
    assert IdlePlan.parse(" 1:0.5 , 3:0.25 ", depth=4).keep == (None, 0.5, None, 0.25)
    assert IdlePlan.parse("3-3:0.5", depth=4).keep == (None, None, None, 0.5)


@pytest.mark.parametrize(
    "entry",
    [
        "3-5",  # no keep
        "3-5=0.7",  # wrong separator
        "a-b:0.5",  # blocks not numbers
        "-1:0.5",  # negative block
        "3-5-7:0.5",  # two dashes
        "12:0.5",  # out of range (depth 12 -> 0..11)
        "10-12:0.5",  # LAST out of range
        "5-3:0.5",  # FIRST > LAST
        "3:0",  # keep 0
        "3:1.5",  # keep > 1
        "3:-0.5",  # negative keep
        "3:abc",  # keep not a number
        "3:nan",  # a NaN compares false both ways
        "3:inf",
    ],
)
def test_parse_errors_name_the_entry(entry):
    with pytest.raises(UsageError) as info:
        IdlePlan.parse(f"1:0.5,{entry}", depth=12)
    message = str(info.value)
    assert repr(entry) in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_parse_empty_plan_is_an_error(text):
    with pytest.raises(UsageError, match="idles no block"):
        IdlePlan.parse(text, depth=12)


@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.0000001, 1.5, float("nan"), float("inf"), "abc", None])
def test_check_keep_rejects(keep):
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        check_keep(keep)


@pytest.mark.parametrize("keep, want", [(1, 1.0), (1.0, 1.0), ("0.5", 0.5), (1e-9, 1e-9)])
def test_check_keep_accepts(keep, want):
    got = check_keep(keep)
    assert isinstance(got, float) and got == want


@pytest.mark.parametrize("keep", [0, 1.5])
def test_schedules_check_keep(keep):
    for schedule in ("idlevit", "constant"):
        with pytest.raises(UsageError):
            make_plan(12, keep, schedule)


def test_make_plan():
    assert make_plan(12, 0.7) == IdlePlan.idlevit(12, 0.7)
    assert make_plan(12, 0.7, "constant") == IdlePlan.constant(12, 0.7)
    # an explicit plan wins over keep/schedule
    assert make_plan(12, 0.7, "idlevit", "3-5:0.5") == IdlePlan.parse("3-5:0.5", 12)


def test_make_plan_unknown_schedule():
    with pytest.raises(UsageError) as info:
        make_plan(12, 0.7, "linear")
    message = str(info.value)
    assert "'linear'" in message and "idlevit" in message and "constant" in message


def test_describe_idlevit():
    text = IdlePlan.idlevit(12, 0.7).describe(196)
    assert text.startswith("blocks 3-5: 0.7 (137), 6-8: 0.49 (96), 9-11: 0.343 (67)")
    assert "\n" not in text


def test_describe_does_not_merge_across_a_gap_or_a_change():
    text = IdlePlan.parse("3:0.5,5:0.5,6-7:0.25", depth=8).describe(16)
    assert text.startswith("blocks 3: 0.5 (8), 5: 0.5 (8), 6-7: 0.25 (4)")
