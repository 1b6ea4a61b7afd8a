"""Every training config key is reachable and documented from the CLI (musar train --help-config)."""

from __future__ import annotations

import dataclasses
import operator

import pytest
import yaml

from musar import cli
from musar.train.config import TrainConfig, load_config, to_dict
from musar.utils.config_help import iter_keys


def test_help_config_lists_every_key_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help-config"])  # no --config needed, like --help
    assert done.value.code == 0
    text = capsys.readouterr().out
    docs = list(iter_keys(TrainConfig))
    keys = [d.key for d in docs]
    assert len(keys) == len(set(keys)) > 60
    # every section is there, down to a list item's keys, and each of these keys by name
    assert {k.split(".")[0] for k in keys} == {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"optim.lr", "lora.subject_rank", "routing.backend", "curriculum.stage1_steps", "curriculum.stage3_steps",
            "data.max_sequence_length", "validation.prompts[].subjects"} <= set(keys)
    for doc in docs:
        assert doc.help, f"config key {doc.key} has no help text"
        assert f"{doc.key}  ({doc.type}, default {doc.default})\n    {doc.help}\n" in text


def test_every_listed_key_is_accepted_by_set() -> None:
    defaults = TrainConfig()
    plain = to_dict(defaults)
    for doc in iter_keys(TrainConfig):
        if "[]" in doc.key:
            continue  # keys of list items are set through the list itself
        value = operator.attrgetter(doc.key)(defaults)
        value = list(value) if isinstance(value, tuple) else value
        cfg = load_config(None, [f"{doc.key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
        assert to_dict(cfg) == plain, doc.key


def test_a_partial_section_keeps_the_fields_own_defaults() -> None:
    # TrainConfig.routing defaults to backend "fast"; setting another routing key must not reset it
    # to RoutingOptions' class default ("auto": flex on CUDA, untested for training).
    assert load_config(None, ["routing.static=true"]).routing.backend == "fast"


def test_help_config_shows_a_sections_default_from_its_parent() -> None:
    # TrainConfig.routing is RoutingOptions(backend="fast"); RoutingOptions' own default is "auto".
    defaults = {d.key: d.default for d in iter_keys(TrainConfig)}
    assert defaults["routing.backend"] == "'fast'"  # formatted as every default: repr
    assert defaults["routing.static"] == "True"
