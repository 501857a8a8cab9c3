"""The documentation keeps up with the code: each test fails when something lacks docs.

In the spirit of sqlite-utils' ``tests/test_docs.py``: the lists come from the
code itself (the pydantic models of :mod:`monitor.config`, the argparse tree of
:func:`monitor.app.cli.build_parser`, the parsers' option names), so a new config
key, command or option fails a test until it is documented.

- every key of every model reachable from :class:`monitor.config.Config` is in
  ``docs/configuration.md``, in backticks, inside the section of its table
  (``## `[mqtt]` ``; rule kinds in a sub-section named after the kind);
- every choice of a ``Literal`` key, every ``*_file`` secret key and every
  option of every device format is documented the same way;
- every ```toml block of ``docs/configuration.md`` is a valid configuration:
  complete ones (with ``[site]``) are read with :mod:`tomllib` and validated
  with :func:`monitor.config.parse`; fragments are validated on top of a
  minimal site;
- every command, sub-command, option and exit code of the CLI is in
  ``docs/cli.md``, options inside their command's section;
- every ``docs/*.md`` file is linked from ``README.md``, and every ``docs/`` or
  ``deploy/`` file the README links to exists.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from monitor import config
from monitor.app import cli
from monitor.intake.parsers import FORMATS, make_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG_MD = DOCS / "configuration.md"
CLI_MD = DOCS / "cli.md"
README = ROOT / "README.md"

#: appended to a configuration fragment so that it can be validated on its own
FRAGMENT_BASE = """

[site]
id = "docs-fragment"
category = "legal_entity"

[[sources]]
topic = "docs/fragment/+"
format = "json"
"""


# --------------------------------------------------------------------------- markdown


@dataclass(frozen=True)
class Section:
    """A heading and its body, sub-sections included."""

    level: int
    title: str
    text: str


def sections(markdown: str) -> list[Section]:
    """Every heading of ``markdown`` (not those inside fenced code) with its body."""
    lines = markdown.splitlines()
    heads: list[tuple[int, int, str]] = []
    fenced = False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.+?)\s*$", line)
        if m and not fenced:
            heads.append((i, len(m.group(1)), m.group(2)))
    out = []
    for n, (start, level, title) in enumerate(heads):
        end = next((i for i, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
        out.append(Section(level, title, "\n".join(lines[start + 1 : end])))
    return out


def find_section(secs: list[Section], marker: str, *, level: int | None = None) -> Section | None:
    """The first section whose title contains ``marker`` (at ``level``, if given)."""
    return next(
        (s for s in secs if marker in s.title and (level is None or s.level == level)), None
    )


def mentioned(name: str, text: str) -> bool:
    """``name`` appears in backticks (`` `name` ``, `` `"name"` ``, or `` `--name ARG` ``)."""
    return re.search(r'`"?' + re.escape(name) + r'(?:"?`|[ =\[])', text) is not None


def toml_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


# --------------------------------------------------------------------------- the config models


def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation refers to (through lists, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in get_args(annotation):
        yield from models_in(arg)


def literals_in(annotation: Any) -> Iterator[str]:
    """The string choices of the ``Literal`` types an annotation refers to."""
    if get_origin(annotation) is Literal:
        yield from (a for a in get_args(annotation) if isinstance(a, str))
        return
    for arg in get_args(annotation):
        yield from literals_in(arg)


@dataclass(frozen=True)
class Key:
    path: str  # dotted, e.g. "mqtt.tls.ca_file"
    name: str  # as written in TOML (the alias, e.g. "from")
    annotation: Any


def keys_of(model: type[BaseModel], prefix: str) -> Iterator[Key]:
    """Every key of ``model`` and, recursively, of the models it contains."""
    for field_name, info in model.model_fields.items():
        name = info.alias or field_name
        yield Key(f"{prefix}.{name}", name, info.annotation)
        for sub in models_in(info.annotation):
            yield from keys_of(sub, f"{prefix}.{name}")


def rule_kinds() -> dict[str, type[BaseModel]]:
    """``kind`` -> model, for every rule kind of the ``rules`` union."""
    kinds: dict[str, type[BaseModel]] = {}
    for model in models_in(config.Config.model_fields["rules"].annotation):
        (kind,) = get_args(model.model_fields["kind"].annotation)
        kinds[str(kind)] = model
    return kinds


def common_rule_fields() -> set[str]:
    """The keys every rule kind has (``id``, ``on_breach``, ...)."""
    fields = [set(m.model_fields) for m in rule_kinds().values()]
    return set.intersection(*fields)


def table_marker(name: str) -> str:
    annotation = config.Config.model_fields[name].annotation
    return f"`[[{name}]]`" if get_origin(annotation) is list else f"`[{name}]`"


@pytest.fixture(scope="module")
def config_md() -> list[Section]:
    return sections(CONFIG_MD.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- configuration.md


def test_every_config_table_has_a_section(config_md: list[Section]) -> None:
    missing = [
        table_marker(name)
        for name in config.Config.model_fields
        if find_section(config_md, table_marker(name), level=2) is None
    ]
    assert not missing, f"docs/configuration.md has no '## ...' section for: {missing}"


def _undocumented(keys: Iterator[Key], section: Section) -> Iterator[str]:
    for key in keys:
        if not mentioned(key.name, section.text):
            yield f"{key.path} (in section {section.title!r})"
        for choice in literals_in(key.annotation):
            if not mentioned(choice, section.text):
                yield f"{key.path} = {choice!r} (in section {section.title!r})"


def test_every_config_key_is_documented_in_its_table(config_md: list[Section]) -> None:
    missing: list[str] = []
    for name, info in config.Config.model_fields.items():
        section = find_section(config_md, table_marker(name), level=2)
        if section is None or name == "rules":
            continue  # the test above reports it; rules are checked per kind below
        for model in models_in(info.annotation):
            missing += _undocumented(keys_of(model, name), section)
    assert not missing, "docs/configuration.md does not document:\n" + "\n".join(missing)


def test_every_rule_key_is_documented_per_kind(config_md: list[Section]) -> None:
    rules = find_section(config_md, table_marker("rules"), level=2)
    assert rules is not None
    rule_secs = sections(rules.text)
    common = common_rule_fields()
    kinds = rule_kinds()
    any_kind = next(iter(kinds.values()))
    missing = list(_undocumented(
        (k for k in keys_of(any_kind, "rules") if k.name in common), rules))
    for kind, model in kinds.items():
        section = find_section(rule_secs, f"`{kind}`")
        if section is None:
            missing.append(f"rules kind {kind!r}: no sub-section titled with `{kind}`")
            continue
        own = (k for k in keys_of(model, f"rules[kind={kind}]")
               if k.path.split(".")[1] not in common or k.path.count(".") > 1)
        missing += _undocumented(own, section)
    assert not missing, "docs/configuration.md does not document:\n" + "\n".join(missing)


def test_every_secret_file_key_is_documented(config_md: list[Section]) -> None:
    missing = []
    for name, info in config.Config.model_fields.items():
        section = find_section(config_md, table_marker(name), level=2)
        assert section is not None
        for model in models_in(info.annotation):
            for key in keys_of(model, name):
                file_key = f"{key.name}_file"
                if file_key in config.SECRET_KEYS and not mentioned(file_key, section.text):
                    missing.append(f"{key.path}_file")
    assert not missing, f"docs/configuration.md does not document: {missing}"


def format_options(fmt: str) -> list[str]:
    """The options a device format knows, from the error a made-up option gives."""
    with pytest.raises(ValueError, match=r"known: ") as exc:
        make_parser(fmt, {"undocumented-probe": "1"})
    known = re.search(r"known: ([^)]*)", str(exc.value))
    assert known is not None
    return [] if known.group(1) == "none" else known.group(1).split(", ")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_its_options_are_documented(
    config_md: list[Section], fmt: str
) -> None:
    section = find_section(config_md, table_marker("sources"), level=2)
    assert section is not None
    assert mentioned(fmt, section.text), f"format {fmt!r} is not in `[[sources]]`"
    missing = [opt for opt in format_options(fmt) if not mentioned(opt, section.text)]
    assert not missing, f"options of format {fmt!r} missing from `[[sources]]`: {missing}"


def _prepare(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make a documented example loadable here: secret files and ${ENV} get dummies."""
    for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", block):
        monkeypatch.setenv(name, f"docs-{name.lower()}")
    secret = tmp_path / "docs-secret"
    secret.write_text("docs-example-secret\n", encoding="utf-8")
    return re.sub(
        r'^(\s*(?:' + "|".join(config.SECRET_KEYS) + r')\s*=\s*)"[^"\n]*"',
        lambda m: f'{m.group(1)}"{secret}"',
        block,
        flags=re.MULTILINE,
    )


def _validate(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.Config:
    text = _prepare(block, tmp_path, monkeypatch)
    if not re.search(r"^\[site\]", text, flags=re.MULTILINE):
        text = text + FRAGMENT_BASE
    data = tomllib.loads(text)
    if "include" not in data:
        return config.parse(data, tmp_path)
    # includes are resolved by the loader, relative to the file: put the file where
    # both spellings used in the docs ("deploy/profiles/..." and "profiles/...") resolve
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")
    (tmp_path / "profiles").symlink_to(ROOT / "deploy" / "profiles")
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return config.load(path)


BLOCKS = toml_blocks(CONFIG_MD.read_text(encoding="utf-8")) if CONFIG_MD.exists() else []


def test_configuration_md_has_complete_examples() -> None:
    complete = [b for b in BLOCKS if re.search(r"^\[site\]", b, flags=re.MULTILINE)]
    assert len(complete) >= 2, "docs/configuration.md should show a minimal and a full config"


@pytest.mark.parametrize(
    "block", BLOCKS, ids=[f"block{i}-line1={b.splitlines()[0][:30]}" for i, b in enumerate(BLOCKS)]
)
def test_every_toml_example_is_a_valid_config(
    block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        _validate(block, tmp_path, monkeypatch)
    except config.ConfigError as exc:
        pytest.fail("example in docs/configuration.md does not validate:\n"
                    + "\n".join(exc.problems) + "\n--- the example:\n" + block)


# --------------------------------------------------------------------------- cli.md


def commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub-)command of ``parser`` as (words, its parser), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words = (*prefix, name)
                yield words, sub
                yield from commands(sub, words)


def arguments(parser: argparse.ArgumentParser) -> Iterator[str]:
    """How each argument of ``parser`` is written: ``--json``, ``-v``, ``SCOPE``."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            yield from action.option_strings
        else:
            yield str(action.metavar or action.dest).upper()


# ``simulate`` hands its arguments to the simulator's own parser (loaded on demand)
CLI_COMMANDS = [(w, cli.simulate_parser() if w == ("simulate",) else p)
                for w, p in commands(cli.build_parser())]


def command_section(secs: list[Section], words: tuple[str, ...]) -> Section | None:
    """The section titled `` `energy-monitor WORDS ...` `` (not one of its sub-commands)."""
    title = re.compile(r"`energy-monitor " + re.escape(" ".join(words)) + r"(?=[ `])")
    return next((s for s in secs if title.search(s.title)), None)


@pytest.fixture(scope="module")
def cli_md() -> list[Section]:
    return sections(CLI_MD.read_text(encoding="utf-8"))


@pytest.mark.parametrize("words", [w for w, _ in CLI_COMMANDS], ids=" ".join)
def test_every_command_has_a_section(cli_md: list[Section], words: tuple[str, ...]) -> None:
    assert command_section(cli_md, words) is not None, (
        f"docs/cli.md has no section titled `energy-monitor {' '.join(words)} ...`")


@pytest.mark.parametrize(
    ("words", "parser"), CLI_COMMANDS, ids=[" ".join(w) for w, _ in CLI_COMMANDS]
)
def test_every_option_is_documented_with_its_command(
    cli_md: list[Section], words: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    section = command_section(cli_md, words)
    if section is None:
        pytest.skip("no section; reported by test_every_command_has_a_section")
    missing = [arg for arg in arguments(parser) if not mentioned(arg, section.text)]
    assert not missing, f"docs/cli.md, `energy-monitor {' '.join(words)}` lacks {missing}"


def test_global_options_and_exit_codes_are_documented() -> None:
    text = CLI_MD.read_text(encoding="utf-8")
    missing = [arg for arg in arguments(cli.build_parser()) if not mentioned(arg, text)]
    codes = (cli.EXIT_OK, cli.EXIT_FAIL, cli.EXIT_USAGE, cli.EXIT_CONFIG)
    missing += [f"exit code {c}" for c in codes if not mentioned(str(c), text)]
    assert not missing, f"docs/cli.md lacks {missing}"


# --------------------------------------------------------------------------- README


def test_every_doc_is_linked_from_the_readme() -> None:
    docs = sorted(p.name for p in DOCS.glob("*.md"))
    readme = README.read_text(encoding="utf-8") if README.exists() else ""
    linked = set(re.findall(r"\(\.?/?docs/([^)#\s]+\.md)(?:#[^)\s]*)?\)", readme))
    linked |= set(re.findall(r"^\[[^\]]+\]:\s*\.?/?docs/(\S+\.md)", readme, flags=re.MULTILINE))
    missing = [name for name in docs if name not in linked]
    assert not missing, "README.md does not link to: " + ", ".join(
        f"[...](docs/{name})" for name in missing)


def test_every_doc_the_readme_links_to_exists() -> None:
    readme = README.read_text(encoding="utf-8") if README.exists() else ""
    targets = re.findall(r"\]\((\.?/?(?:docs|deploy)/[^)#\s]+)(?:#[^)\s]*)?\)", readme)
    dangling = sorted({t for t in targets if not (ROOT / t).exists()})
    assert not dangling, f"README.md links to files that do not exist: {dangling}"
