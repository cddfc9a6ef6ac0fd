"""Every command-line default exists once: an option that sets a config field takes its default (and help) from the
field (``cxrlab.cli.options.from_field``), never from a literal repeated in the typer signature.

The walk covers every registered command; a new command must say which configs its options set (``COMMANDS``).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from typing import Any

import pytest
import typer
from pydantic import BaseModel, Field
from typer.main import get_command

from conftest import REPO
from cxrlab.analysis.configs import CompareConfig, EvalConfig, ExplainConfig, MineConfig, ValidateConfig
from cxrlab.cli import app, main
from cxrlab.cli import data as cli_data
from cxrlab.cli import evaluate as cli_evaluate
from cxrlab.cli import explain as cli_explain
from cxrlab.cli import mine as cli_mine
from cxrlab.cli import review as cli_review
from cxrlab.cli import serve as cli_serve
from cxrlab.cli import sources as cli_sources
from cxrlab.cli import sweep as cli_sweep
from cxrlab.cli import train as cli_train
from cxrlab.cli.options import comma_list, from_field
from cxrlab.config import Config, StrictModel, field_default
from cxrlab.data.configs import AuditConfig, IngestConfig, SplitConfig, SynthConfig
from cxrlab.inference.settings import ModelExportSettings, PredictSettings
from cxrlab.pipeline import RunConfig
from cxrlab.review.config import ExportConfig, ReviewConfig, ReviewSettings
from cxrlab.serve.settings import ServeSettings
from cxrlab.sweep.spec import SweepConfig

for _mod in (cli_data, cli_train, cli_evaluate, cli_explain, cli_sweep, cli_serve, cli_sources, cli_review, cli_mine):
    _mod.register(app)  # idempotent, as main() does

# command -> the configs its options set (none: the command's options map to no config)
COMMANDS: dict[str, list[type[BaseModel]]] = {
    "data ingest": [IngestConfig],
    "data synth": [SynthConfig],
    "data split": [SplitConfig],
    "data audit": [AuditConfig],
    "train": [Config],
    "evaluate": [EvalConfig],
    "compare": [CompareConfig],
    "report": [],
    "run": [RunConfig],
    "explain": [ExplainConfig],
    "sweep": [SweepConfig],
    "predict": [PredictSettings],
    "export": [ModelExportSettings],
    "serve": [ServeSettings],
    "validate": [ValidateConfig],
    "fit-shift": [PredictSettings],
    "review": [ReviewConfig, ExportConfig, ReviewSettings],
    "mine": [MineConfig],
}
# (command, parameter) -> field, where the option's name differs from the field's
RENAMED = {
    ("data ingest", "source_name"): "source_names",
    ("data split", "audit_dir"): "audit",
    ("data split", "holdout_source"): "holdout_sources",
    ("run", "set_"): "overrides",
    ("run", "demo_n"): "demo_n_per_class",
    ("validate", "set_"): "overrides",
    ("validate", "seed"): "split_seed",
    ("sweep", "config"): "base_config",
}
# flags that switch a field away from its default: (command, parameter) -> (field, the field's default)
NEGATED = {
    ("run", "skip_explain"): ("explain", True),
    ("run", "skip_audit"): ("audit", True),
    ("explain", "quiet"): ("progress", True),
    ("explain", "no_wandb"): ("wandb", "auto"),
    ("mine", "quiet"): ("progress", True),
    ("review", "no_cam_overlap"): ("cam_overlap", True),
}
# options named like a field whose command-line meaning differs on purpose, with the reason
OWN_MEANING = {
    ("review", "reader"): "unset = the login name of whoever starts the review (the settings' '' = no name)",
}


def _commands() -> dict[str, tuple[Any, Any]]:
    """'name' / 'group name' -> (the typer callback, the click command) for every registered command."""
    out: dict[str, tuple[Any, Any]] = {}
    root = get_command(app)
    for info in app.registered_commands:
        name = info.name or info.callback.__name__
        out[name] = (info.callback, root.commands[name])
    for g in app.registered_groups:
        group = root.commands[g.name]
        for info in g.typer_instance.registered_commands:
            out[f"{g.name} {info.name}"] = (info.callback, group.commands[info.name])
    return out


def _cli_form(default: Any, cli_default: Any) -> Any:
    """The field default as the option holds it (a comma word for tuples typed as one word, lists for tuples)."""
    if isinstance(cli_default, str) and isinstance(default, tuple | list):
        return comma_list(default)
    return list(default) if isinstance(default, tuple) else default


def option_problems(command: str, callback: Any, click_cmd: Any, models: list[type[BaseModel]]) -> list[str]:
    """What is wrong with ``command``'s options: a default that is not its field's, or one written as a literal."""
    sig = inspect.signature(callback).parameters
    fields = {name: m for m in models for name in m.model_fields}
    problems = []
    for p in click_cmd.params:
        if p.param_type_name != "option" or p.name == "help":
            continue
        key = (command, p.name)
        if key in NEGATED:
            field, on = NEGATED[key]
            owner = next(m for m in models if field in m.model_fields)
            if p.default is not False or field_default(owner, field) != on:
                problems.append(f"{command} --{p.name}: off by default must mean {owner.__name__}.{field}={on!r}")
            continue
        field = RENAMED.get(key, p.name)
        if field not in fields or key in OWN_MEANING:
            continue
        model = fields[field]
        declared = sig[p.name].default
        if getattr(declared, "config_field", None) not in [(m, field) for m in models]:
            problems.append(
                f"{command} {p.opts[0]}: sets {model.__name__}.{field} but its default is written in the signature; "
                f"use from_field({model.__name__}, {field!r}, ...)"
            )
        info = model.model_fields[field]
        want = ... if info.is_required() else _cli_form(field_default(model, field), p.default)
        got = ... if p.required else p.default
        if got != want and not (want is ... and p.required):
            problems.append(f"{command} {p.opts[0]}: default {got!r} but {model.__name__}.{field} = {want!r}")
    return problems


def test_every_command_is_classified() -> None:
    assert set(_commands()) == set(COMMANDS), "a new command must list the configs its options set (COMMANDS)"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_option_defaults_come_from_the_config_fields(command: str) -> None:
    callback, click_cmd = _commands()[command]
    assert option_problems(command, callback, click_cmd, COMMANDS[command]) == []


def test_the_check_sees_options_of_every_configured_command() -> None:
    # a check over nothing cannot fail: most options of the configured commands must map to a field
    seen = 0
    for command, (_, click_cmd) in _commands().items():
        fields = {f for m in COMMANDS[command] for f in m.model_fields}
        seen += sum(RENAMED.get((command, p.name), p.name) in fields for p in click_cmd.params)
    assert seen >= 100


class _Toy(StrictModel):
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples")
    fractions: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train,val,test shares")


def _toy_problems(fn: Any) -> list[str]:
    toy = typer.Typer()
    toy.command("toy")(fn)
    toy.command("other")(lambda: None)  # two commands: get_command returns a group
    return option_problems("toy", fn, get_command(toy).commands["toy"], [_Toy])


def test_the_check_fails_on_a_literal_default() -> None:
    def different(n_boot: int = typer.Option(999, "--n-boot")) -> None: ...

    def same_literal(n_boot: int = typer.Option(1000, "--n-boot")) -> None: ...

    def from_the_field(
        n_boot: int = from_field(_Toy, "n_boot", "--n-boot"),
        fractions: str = from_field(_Toy, "fractions", "--fractions", to_cli=comma_list),
    ) -> None: ...

    bad = _toy_problems(different)
    assert any("999" in p for p in bad) and any("written in the signature" in p for p in bad)
    assert [p for p in _toy_problems(same_literal) if "written in the signature" in p]
    assert _toy_problems(from_the_field) == []


def test_from_field_takes_default_help_and_bounds() -> None:
    opt = from_field(_Toy, "n_boot", "--n-boot", note="Repeat it.")
    assert opt.default == 1000 and opt.min == 0 and opt.max is None
    assert opt.help == "Bootstrap resamples. Repeat it."
    assert from_field(_Toy, "fractions", "--f").default == [0.8, 0.1, 0.1]
    assert from_field(_Toy, "fractions", "--f", to_cli=comma_list).default == "0.8,0.1,0.1"
    assert from_field(EvalConfig, "target", "--target").default is ...
    with pytest.raises(KeyError, match="no field 'nboot'"):
        from_field(_Toy, "nboot", "--n-boot")
    with pytest.raises(TypeError, match="description"):
        from_field(_Toy, "n_boot", "--n-boot", help="a second help text")


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["evaluate", "--help"], ["--n-boot", "[default: 1000]", "--costly-class", "Bootstrap resamples"]),
        (["serve", "--help"], ["--max-upload-mb", "[default: 20.0]", "[default: 8000]"]),
        (["data", "split", "--help"], ["[default: 0.8,0.1,0.1]", "[default: 42]"]),
        (["run", "--help"], ["[default: 150]", "[default: 128]", "[default: 6]"]),
    ],
)
def test_help_shows_the_config_defaults(
    args: list[str], shown: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in shown:
        assert text in out, text


def test_pipeline_and_validate_take_the_stages_defaults() -> None:
    assert field_default(RunConfig, "n_boot") == field_default(EvalConfig, "n_boot")
    assert field_default(RunConfig, "fractions") == field_default(SplitConfig, "fractions")
    assert field_default(RunConfig, "split_seed") == field_default(SplitConfig, "seed")
    assert field_default(RunConfig, "workers") == field_default(IngestConfig, "workers")
    assert field_default(ValidateConfig, "split_seed") == field_default(SplitConfig, "seed")
    # no default literal of another config is written again in pipeline.py
    src = (REPO / "src" / "cxrlab" / "pipeline.py").read_text()
    assert "(0.8, 0.1, 0.1)" not in src and "Field(1000" not in src and "split_seed: int = 42" not in src


def test_help_imports_no_stage() -> None:
    # the configs the options come from live apart from their stages: --help loads no torch, pandas or OpenCV
    code = (
        "import sys; from cxrlab.cli import main; rc = main(['--help']);"
        "heavy = sorted({'torch', 'pandas', 'cv2'} & set(sys.modules)); print(rc, heavy)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout + r.stderr


def test_bool_flags_keep_their_forms() -> None:
    # --csv/--no-csv: unset = automatic (None), as before; the flag still reads SRC as a CSV
    _, cmd = _commands()["data ingest"]
    csv = next(p for p in cmd.params if p.name == "csv")
    assert csv.default is None and "--csv" in csv.opts and "--no-csv" in csv.secondary_opts
