"""The command line of ``python -m cots.train``: argparse flags generated from the config dataclasses.

Every field of :class:`TrainConfig` is a flag, with dots for the nested sections:
``--steps 100``, ``--optim.lr 3e-4``, ``--model.queue_size 4096``. ``--config FILE``
(JSON or TOML, the same nesting) gives the starting values and the flags override it.

- bool fields take ``true``/``false`` (also yes/no, on/off, 1/0); alone (``--progress``) they mean true.
- tuple fields take ``0.9,0.98`` or a JSON list.
- ``None`` is spelt ``none`` (or ``null``) where a field allows it.
- dict fields (``model.vision``, ``model.text``) take a JSON object,
  ``--model.vision '{"depth": 2}'``, or one key at a time, ``--model.vision.depth 2``
  (the value is read as JSON when it parses, else kept as a string). Both update the
  file's dict key by key, the one-key flags last.

Errors name the flag: argparse's own (unknown flags, with the closest known flag as a
hint; values that do not convert) and the config's checks (``batch_size must be
positive``) all raise :class:`ValueError` from :func:`parse_config`; ``main`` prints
them with the usage line and exits with status 2, as argparse does.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from .config import TrainConfig, config_from_dict, convert_value, field_types, load_file

PROG = "python -m cots.train"
USAGE = f"{PROG} [--config FILE.json|FILE.toml] [--section.field VALUE ...]"


class FlagError(ValueError):
    """A command line argparse refused (the message is argparse's)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`FlagError` instead of exiting, so that
    :func:`parse_config` reports every kind of bad input alike."""

    def error(self, message: str) -> typing.NoReturn:
        raise FlagError(message)


@dataclasses.dataclass(frozen=True)
class _Flag:
    key: str  # "optim.lr"
    tp: Any
    default: Any
    doc: str


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's entry in the "Attributes:" section of ``cls``'s docstring, as one line
    (entries may name several fields: ``betas, eps: ...``)."""
    docs: dict[str, str] = {}
    names: list[str] = []
    in_attributes = False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        if line.strip() == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes:
            continue
        entry = re.match(r"^    (\w+(?:, \w+)*): (.*)$", line)
        if entry:
            names = entry.group(1).split(", ")
            for name in names:
                docs[name] = entry.group(2)
        elif line.startswith("        ") and names:
            for name in names:
                docs[name] += " " + line.strip()
        elif line.strip():
            break  # the next section
    # Sphinx roles and literals read plainly in a terminal.
    return {k: re.sub(r":\w+:`~?([^`]*)`", r"\1", v).replace("``", "") for k, v in docs.items()}


def _sections(cls: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, type, list[_Flag]]]:
    """(title, dataclass, its leaf flags) for ``cls`` and each dataclass field of it, in order."""
    types, docs, defaults = field_types(cls), _field_docs(cls), cls()
    leaves, nested = [], []
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((f"{prefix}{f.name}.", tp))
        else:
            leaves.append(_Flag(prefix + f.name, tp, getattr(defaults, f.name), docs.get(f.name, "")))
    yield prefix.rstrip(".") or "run", cls, leaves
    for sub_prefix, sub_cls in nested:
        yield from _sections(sub_cls, sub_prefix)


def _shown(value: Any) -> str:
    """``value`` as one would type it after the flag."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _metavar(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return ",".join(_metavar(a) for a in args)
    if typing.get_origin(tp) is dict:
        return "JSON"
    if args and typing.get_origin(tp) is not Literal:  # X | None
        return _metavar(args[0])
    return {bool: "BOOL", int: "INT", float: "FLOAT"}.get(tp, "STR")


def _converter(tp: Any, key: str) -> typing.Callable[[str], Any]:
    """argparse's ``type=``: the value as ``tp``; a bad one gives argparse an error naming ``key``."""

    def convert(text: str) -> Any:
        try:
            return convert_value(text, tp, key)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    """The parser of every flag, grouped by section, each with its default in the help."""
    parser = _Parser(
        prog=PROG,
        usage=USAGE,
        description="Train a COTS model. Flags override the config file; nested fields use dots.",
        epilog=(
            "Dict fields (model.vision, model.text) also take one key at a time: --model.vision.depth 2. "
            "Under torchrun (torchrun --nproc_per_node N -m cots.train ...) the run is data-parallel."
        ),
        allow_abbrev=False,  # --optim.l must not silently mean --optim.lr
        argument_default=argparse.SUPPRESS,  # only the flags given override the file
    )
    parser.add_argument("--config", metavar="FILE", help="a JSON or TOML file of the same nesting as the flags")
    for title, cls, flags in _sections():
        group = parser.add_argument_group(title, f"{cls.__name__} fields")
        for flag in flags:
            help_text = f"{flag.doc} (default: {_shown(flag.default)})".replace("%", "%%")
            options: dict[str, Any] = {"dest": flag.key, "help": help_text, "metavar": _metavar(flag.tp)}
            if typing.get_origin(flag.tp) is Literal:
                options.update(choices=typing.get_args(flag.tp), metavar=None)
            else:
                options["type"] = _converter(flag.tp, flag.key)
            if flag.tp is bool:
                options.update(nargs="?", const=True)
            group.add_argument(f"--{flag.key}", **options)
    return parser


def help_text() -> str:
    """``--help``: every flag with its type, meaning and default."""
    return build_parser().format_help()


def _flag_kinds() -> dict[str, set[str]]:
    """The flag keys of the dict fields ("dict") and of the others ("leaf")."""
    kinds: dict[str, set[str]] = {"dict": set(), "leaf": set()}
    for _, _, flags in _sections():
        for flag in flags:
            kinds["dict" if typing.get_origin(flag.tp) is dict else "leaf"].add(flag.key)
    return kinds


def _json_or_string(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _dict_keys(extras: Sequence[str]) -> Iterator[tuple[str, str, Any]]:
    """(dict field, key, value) of each ``--model.vision.KEY VALUE`` flag argparse left over.

    Raises:
        FlagError: anything else left over, naming the closest known flag.
    """
    kinds = _flag_kinds()
    i = 0
    while i < len(extras):
        arg = extras[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        owner = next((d for d in sorted(kinds["dict"]) if name.startswith(d + ".")), None)
        if owner is None:
            leaf = next((k for k in sorted(kinds["leaf"]) if name.startswith(k + ".")), None)
            if leaf is not None:
                raise FlagError(f"argument --{name}: --{leaf} takes one value; it has no keys")
            known = sorted(kinds["dict"] | kinds["leaf"] | {"config"})
            close = difflib.get_close_matches(name, known, n=1) if name else []
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise FlagError(f"unrecognized arguments: {' '.join(extras[i:])}{hint}")
        if not eq:
            if i + 1 == len(extras) or extras[i + 1].startswith("--"):
                raise FlagError(f"argument --{name}: expected one argument")
            i += 1
            value = extras[i]
        i += 1
        yield owner, name[len(owner) + 1 :], _json_or_string(value)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"optim.lr": 1} -> {"optim": {"lr": 1}}."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, key by key at every level of nesting."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of ``--config FILE`` (JSON/TOML) overridden by the other flags.

    ``--help`` prints the help and raises ``SystemExit(0)``, as argparse does.

    Raises:
        ValueError: an unknown flag, a malformed one, a value of the wrong type or a
            config that fails its checks; the message names the flag or key.
    """
    namespace, extras = build_parser().parse_known_args(argv)
    given = vars(namespace)
    config_path = given.pop("config", None)
    overrides = _nest(given)
    for owner, key, value in _dict_keys(extras):
        overrides = _merge(overrides, _nest({owner: {key: value}}))
    base = load_file(config_path) if config_path is not None else {}
    return config_from_dict(_merge(base, overrides))
