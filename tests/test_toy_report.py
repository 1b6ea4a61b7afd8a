"""The report's arithmetic over training seeds, the per-seed gate rule and the claims (issue 21)."""

from __future__ import annotations

import math

import pytest

from musar.toy import gates
from musar.toy.report import claims, combine_seeds, gate_results, render_markdown
from musar.toy.variants import FAMILIES, VARIANTS, trained_members, variant_dir


def test_combine_seeds_gives_the_mean_and_the_error_across_seeds() -> None:
    one = {"all_present": (0.8, 0.05)}
    assert combine_seeds([one]) == one  # one seed keeps its error over images
    rates = combine_seeds([{"all_present": (0.6, 0.1)}, {"all_present": (0.8, 0.1)}, {"all_present": (1.0, 0.1)}])
    m, se = rates["all_present"]
    assert m == pytest.approx(0.8) and se == pytest.approx(0.2 / math.sqrt(3))


def test_a_gate_over_seeds_holds_only_if_every_seed_passes() -> None:
    seeds = [{"all_present": (0.9, 0.05), "entanglement": (0.02, 0.01)},
             {"all_present": (0.5, 0.05), "entanglement": (0.03, 0.01)}]
    results = {"custom2": combine_seeds(seeds)}  # mean 0.70 passes the 0.60 gate, seed 2 does not
    by_key = {k: (text, ok) for _, k, text, ok in gates.check(results, {"custom2": seeds})}
    assert by_key["custom2.all_present"][1] is False and "0.90 / 0.50" in by_key["custom2.all_present"][0]
    assert by_key["custom2.entanglement"][1] is True  # both seeds <= 0.05
    assert gates.check(results)[0][3] is None  # a group nobody measured
    assert next(r for r in gates.check(results) if r[1] == "custom2.all_present")[3] is True  # no seeds: the mean decides
    assert next(r for r in gates.check({}) if r[1] == "custom3.all_present")[3] is None


def test_claim_needs_two_standard_errors_in_every_seed() -> None:
    results = {
        "three": {"seed_rates": [{"all_present": [0.7, 0.05]}, {"all_present": [0.4, 0.05]}]},
        "three_no_dynamic": {"rates": {"all_present": [0.2, 0.05]}},
        "four": {"seed_rates": [{"all_present": [0.6, 0.05]}]},
        "four_no_dynamic": {"rates": {"all_present": [0.5, 0.05]}},
    }
    got = {name: ok for name, _, ok in claims(results)}
    assert got["three > three_no_dynamic, all present"] is True  # 0.4 - 0.2 > 2 * sqrt(2) * 0.05
    assert got["four > four_no_dynamic, all present"] is False  # 0.1 < 0.14
    assert got["full > no_dynamic"] is None


def test_full_has_three_training_seeds_and_members_are_found_on_disk(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert FAMILIES["full"] == ("full", "full_seed1", "full_seed2")
    assert VARIANTS["full_seed2"].overrides == ("seed=2",) and VARIANTS["full_seed2"].family_name == "full"
    assert trained_members(tmp_path, "full") == []
    for name in ("full", "full_seed2"):
        variant_dir(tmp_path, name).mkdir(parents=True)
        (variant_dir(tmp_path, name) / "lora.safetensors").write_bytes(b"")
    assert trained_members(tmp_path, "full") == ["full", "full_seed2"]
    assert trained_members(tmp_path, "no_dynamic") == []


def test_markdown_shows_the_spread_over_seeds() -> None:
    seed_rates = [{"all_present": [0.7, 0.1]}, {"all_present": [0.9, 0.1]}]
    results = {"full": {"label": "MUSAR (full)", "rates": {k: list(v) for k, v in combine_seeds(
        [{k: tuple(v) for k, v in r.items()} for r in seed_rates]).items()}, "seed_rates": seed_rates}}
    table = render_markdown(results, cases=2, seeds=(0,))
    assert "MUSAR (full) (2 training seeds)" in table and "0.80 ± 0.10 [0.70–0.90]" in table
    measured, per_seed = gate_results(results)
    assert measured["custom2"]["all_present"][0] == pytest.approx(0.8) and len(per_seed["custom2"]) == 2
