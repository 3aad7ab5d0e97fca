"""Typed options from a TOML file and `key=value` overrides: one idiom for every tool.

A tool describes its options as dataclasses: a root dataclass whose fields are plain values
(top-level keys), sections (a dataclass field: a `[section]` table) or lists of tables (a
`[[name]]` array, each table a dataclass chosen by its `type` key; or, inside a section, a
`list[SomeDataclass]` field: `[[section.name]]` tables of that one dataclass, e.g. the
`[[data.sources]]` of a training config). Every field is declared with `opt(default, help, ...)`,
which also carries what is allowed:

    lr: float = opt(3e-4, "peak learning rate", gt=0)
    dtype: Dtype = opt("float32", "...")           # Dtype = Literal["float32", "bf16-mixed", ...]

Values are read in three layers, later wins: the defaults, the TOML file, then `key=value`
overrides (`optim.lr=3e-4`; the value is parsed as a TOML literal, anything else is a string; a
bare key is accepted when exactly one section has it). Every value is checked where it enters,
against the declared type (a bool is a TOML/JSON bool, never the string "false"; an int is not a
bool; a float is finite), the Literal's choices and the range, and an unknown key is an error
naming the closest known key. Each message names the file (or "command line"), the key and what
is allowed. `help_text` and `options_markdown` are generated from the same declarations, so
`--help` and the README cannot go stale.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from model.errors import SFTError
from model.files import read_text

T = TypeVar("T")


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None,
        variants: dict[str, type] | None = None) -> Any:
    """A dataclass field with a default, a one-line description and its allowed range.

    variants: for a list of tables, the dataclass of each `type = "..."` value.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "variants": variants}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_section(typ: Any) -> bool:
    return isinstance(typ, type) and dataclasses.is_dataclass(typ)


def _table_item(typ: Any) -> type | None:
    """The dataclass of a `list[SomeDataclass]` field (`[[section.name]]` tables), else None."""
    args = get_args(typ) if get_origin(typ) is list else ()
    return args[0] if args and _is_section(args[0]) else None


def _fields(obj_or_type: Any) -> list[tuple[dataclasses.Field, Any]]:
    cls = obj_or_type if isinstance(obj_or_type, type) else type(obj_or_type)
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def all_keys(schema: Any) -> list[str]:
    """Every option as 'key' or 'section.key', in declaration order."""
    keys = []
    for f, typ in _fields(schema):
        if _is_section(typ):
            keys += [f"{f.name}.{g.name}" for g, _ in _fields(typ)]
        else:
            keys.append(f.name)
    return keys


# ----------------------------------------------------------------------------- checking values


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    parts = [f">= {m['ge']}" if m.get("ge") is not None else "", f"> {m['gt']}" if m.get("gt") is not None else "",
             f"<= {m['le']}" if m.get("le") is not None else "", f"< {m['lt']}" if m.get("lt") is not None else ""]
    return " and ".join(p for p in parts if p)


def check_value(value: Any, typ: Any, f: dataclasses.Field, key: str, where: str) -> Any:
    """`value` converted to the field's type, or an SFTError naming where, key and what is allowed."""
    def bad(what: str) -> SFTError:
        return SFTError(f"{where}: '{key}' must be {what}, got {value!r}")

    if get_origin(typ) is Literal:
        choices = get_args(typ)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SFTError(f"{where}: '{key}' must be one of {', '.join(map(str, choices))}, "
                           f"got {value!r}{hint}")
        return value
    if _table_item(typ):
        if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise SFTError(f"{where}: '{key}' must be a list of tables ([[{key}]])")
        return [_fill(_table_item(typ)(), v, f"{key}[{i}]", where, f"'{key}[{i}]'") for i, v in enumerate(value)]
    if get_origin(typ) is list or typ is list:
        if isinstance(value, str):  # `lora.targets=q_proj,v_proj` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad("list")
        item = (get_args(typ) or (Any,))[0]
        if item is str and not all(isinstance(v, str) for v in value):
            raise bad("list of strings")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise bad("bool (true or false, not a string)")
        return value
    if typ is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("int")
    elif typ is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("float (a number)")
        value = float(value)
        if not math.isfinite(value):
            raise bad("float (a finite number)")
    elif typ is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `run.name=7`
        if not isinstance(value, str):
            raise bad("str")
    m = f.metadata
    ok = ((m.get("ge") is None or value >= m["ge"]) and (m.get("gt") is None or value > m["gt"])
          and (m.get("le") is None or value <= m["le"]) and (m.get("lt") is None or value < m["lt"]))
    if not ok:
        raise bad(_allowed(f))
    return value


# ----------------------------------------------------------------------------- setting keys


def _unknown(schema: Any, key: str, where: str, aliases: dict[str, str]) -> SFTError:
    keys = all_keys(schema)
    leaf = key.split(".")[-1]
    close = [aliases[leaf]] if leaf in aliases else \
        difflib.get_close_matches(key, keys + [k.split(".")[-1] for k in keys], n=1, cutoff=0.5)
    if close and close[0] not in keys:  # matched a bare name: show it with its section
        close = [k for k in keys if k.endswith("." + close[0])][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the options"
    return SFTError(f"{where}: unknown option '{key}'{hint}")


def _table(value: Any, f: dataclasses.Field, key: str, where: str) -> Any:
    """One `[[key]]` table -> the dataclass its `type` names (every key of it checked)."""
    variants = f.metadata.get("variants") or {}
    if not isinstance(value, dict):
        raise SFTError(f"{where}: '{key}' entries must be tables ([[{key}]])")
    kind = value.get("type")
    if kind not in variants:
        close = difflib.get_close_matches(str(kind), list(variants), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SFTError(f"{where}: [[{key}]] type {kind!r} is unknown; {hint}known: {', '.join(variants)}")
    return _fill(variants[kind](), {k: v for k, v in value.items() if k != "type"}, key, where,
                 f"[[{key}]] type {kind}")


def _fill(table: Any, value: dict, key: str, where: str, label: str) -> Any:
    """Set each key of one TOML table on the dataclass `table`, every value checked."""
    fields = {g.name: (g, typ) for g, typ in _fields(table)}
    for name, v in value.items():
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SFTError(f"{where}: {label}: unknown key '{name}'; {hint}known: {', '.join(fields) or '(none)'}")
        g, typ = fields[name]
        setattr(table, name, check_value(v, typ, g, f"{key}.{name}", where))
    return table


def set_option(obj: Any, key: str, value: Any, where: str, aliases: dict[str, str] | None = None) -> None:
    """Set one option: 'section.name', a top-level name, a bare name owned by exactly one
    section, or a whole `[section]` table (a dict)."""
    aliases = aliases or {}
    fields = {f.name: (f, typ) for f, typ in _fields(obj)}
    if key in fields and _is_section(fields[key][1]):  # a [section] table from the file
        if not isinstance(value, dict):
            raise SFTError(f"{where}: '{key}' is a section: write [{key}] or {key}.NAME=VALUE")
        for name, v in value.items():
            set_option(obj, f"{key}.{name}", v, where, aliases)
        return
    keys = all_keys(obj)
    if key not in keys and "." not in key:  # a bare name: accept when exactly one section has it
        owners = [k for k in keys if k.split(".")[-1] == key]
        if len(owners) > 1:
            raise SFTError(f"{where}: '{key}' is ambiguous, write one of {', '.join(owners)}")
        key = owners[0] if owners else key
    if key not in keys:
        raise _unknown(obj, key, where, aliases)
    head, _, rest = key.partition(".")
    f, typ = fields[head]
    if rest:
        section = getattr(obj, head)
        g, gt = next((g, gt) for g, gt in _fields(section) if g.name == rest)
        setattr(section, rest, check_value(value, gt, g, key, where))
    elif f.metadata.get("variants"):
        if not isinstance(value, list):
            raise SFTError(f"{where}: '{key}' must be a list of [[{key}]] tables")
        setattr(obj, head, [_table(v, f, key, where) for v in value])
    else:
        setattr(obj, head, check_value(value, typ, f, key, where))


def parse_value(text: str) -> Any:
    """A command-line value as a TOML literal (`3e-4`, `true`, `[1, 2]`), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # not a TOML literal: a bare string such as a path or a name


def load_options(schema: type[T], path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = (),
                 aliases: dict[str, str] | None = None, skip: typing.Callable[[str], bool] | None = None) -> T:
    """Defaults, then the TOML file, then `key=value` overrides, each value checked.

    skip(key): keys of the FILE this tool does not read (e.g. data.inspect reads only model.path
    and [data] from a training config); every key it does read is checked as usual.
    """
    obj = schema()
    if path is not None:
        try:
            data = tomllib.loads(read_text(path, "config file"))
        except tomllib.TOMLDecodeError as e:
            raise SFTError(f"{path}: not valid TOML: {e}") from None
        for key, value in data.items():
            if isinstance(value, dict):  # a [section]: key by key, so skip() sees 'section.name'
                for name, v in value.items():
                    if not (skip and skip(f"{key}.{name}")):
                        set_option(obj, f"{key}.{name}", v, str(path), aliases)
            elif not (skip and skip(key)):
                set_option(obj, key, value, str(path), aliases)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SFTError(f"command line: expected key=value, got '{item}'")
        set_option(obj, key.strip(), parse_value(text.strip()), "command line", aliases)
    return obj


# ----------------------------------------------------------------------------- writing and help


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v)


def to_toml(obj: Any) -> str:
    """The resolved options as TOML text (readable back with load_options)."""
    top, sections, tables = [], [], []
    for f, typ in _fields(obj):
        value = getattr(obj, f.name)
        if _is_section(typ):
            sections += [f"[{f.name}]"] + [f"{g.name} = {_fmt(getattr(value, g.name))}"
                                           for g, gt in _fields(typ) if not _table_item(gt)] + [""]
            for g, gt in _fields(typ):  # [[section.name]] tables after the section's keys, with the
                item = _table_item(gt)      # keys that differ from the defaults (a default may be "unset")
                for t in getattr(value, g.name) if item else []:
                    sections += [f"[[{f.name}.{g.name}]]"] + [f"{h.name} = {_fmt(getattr(t, h.name))}"
                                                               for h, _ in _fields(t)
                                                               if getattr(t, h.name) != getattr(item(), h.name)] + [""]
        elif f.metadata.get("variants"):
            kinds = {cls: k for k, cls in f.metadata["variants"].items()}
            for t in value:
                tables += [f"[[{f.name}]]", f'type = "{kinds[type(t)]}"'] + \
                    [f"{g.name} = {_fmt(getattr(t, g.name))}" for g, _ in _fields(t)] + [""]
        else:
            top.append(f"{f.name} = {_fmt(value)}")
    return "\n".join(top + ([""] if top else []) + sections + tables)


def _rows(schema: Any) -> list[tuple[str, str, str]]:
    obj = schema() if isinstance(schema, type) else schema
    rows = []
    for f, typ in _fields(obj):
        if _is_section(typ):
            sec = getattr(obj, f.name)
            for g, gt in _fields(sec):
                rows.append((f"{f.name}.{g.name}", repr(getattr(sec, g.name)), _describe(g, gt)))
                item = _table_item(gt)
                rows += [(f"{f.name}.{g.name}[].{h.name}", repr(getattr(item(), h.name)), _describe(h, ht))
                         for h, ht in _fields(item)] if item else []
        else:
            rows.append((f.name, repr(getattr(obj, f.name)), _describe(f, typ)))
    return rows


def _describe(f: dataclasses.Field, typ: Any) -> str:
    extra = [" | ".join(map(str, get_args(typ)))] if get_origin(typ) is Literal else []
    if _allowed(f):
        extra.append(_allowed(f))
    return f.metadata.get("help", "") + (f" ({'; '.join(extra)})" if extra else "")


def help_text(schema: Any) -> str:
    """One line per option: key, default, description."""
    rows = _rows(schema)
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"  {k:<{w0}}  {d:<{w1}}  {h}" for k, d, h in rows)


def options_markdown(schema: Any) -> str:
    """The options table for the README, from the same source as --help."""
    out = ["| option | default | meaning |", "|---|---|---|"]
    out += [f"| `{k}` | `{d.replace('|', chr(92) + '|')}` | {h.replace('|', chr(92) + '|')} |"
            for k, d, h in _rows(schema)]
    return "\n".join(out)
