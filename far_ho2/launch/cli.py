"""The command line of every launcher: flags generated from its configuration dataclass, and one
error path.

A configuration field declared with ``setting`` becomes a flag: its default is the field's (or a
launcher's preset), its help and bounds are the field's metadata, its type the field's
(``Optional[int]`` an int flag whose default may be None, a tuple a list flag, a str with
``choices`` an enum, a bool ``--name``/``--noname``); ``flag=`` names it when the flag is not the
field's name (e.g. ``--T`` for the field ``steps``). Fields declared without ``setting`` get no
generated flag (a launcher defines them itself).

``run(main, names)`` parses the command line and runs ``main``; whatever stops it ends the process
with one line on stderr, naming the flags as the user wrote them, before any help text and without
a traceback:

    Error: ...          exit 1: a bad flag value or combination, missing data, a --logdir in use or
                        holding another run (``LaunchError``, ``workdir`` errors, absl's flag errors)
    Diverged: ...       exit 1: ``far_ho2.DivergenceError`` (a fresh run leaves nothing behind)
    Interrupted: ...    exit 128 + the signal: Ctrl-C or SIGTERM, once the run is saved (in ``fit``,
                        ``callbacks.Checkpoint`` saves; elsewhere the last checkpoint stands)
"""

import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
import typing
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from far_ho2.guard import DivergenceError
from far_ho2.launch import callbacks, workdir

HELP, FLAG, LOWER, UPPER, POSITIVE, BELOW, CHOICES, ITEM = (
    "help", "flag", "lower", "upper", "positive", "below", "choices", "item")


class LaunchError(ValueError):
    """A problem the user can fix, said in one line in flag names."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside ``fit`` (where ``callbacks.Checkpoint`` handles it): stops the launch as
    Ctrl-C does, the run's last checkpoint kept."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    """Raises ``Terminated``, except in a finalizer (``__del__``), where Python would print the
    exception and drop it: there the signal is delivered again a moment later."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        frame = frame.f_back
    raise Terminated(signum)


def setting(default: Any, help: str, *, flag: Optional[str] = None, lower: Optional[float] = None,
            upper: Optional[float] = None, positive: bool = False, below: Optional[float] = None,
            choices: Optional[Sequence[str]] = None, item: type = str) -> Any:
    """A configuration field that is a flag (see the module docstring).

    Args:
        default: the field's default.
        help: the flag's help.
        flag: the flag's name, if not the field's.
        lower: an inclusive lower bound.
        upper: an inclusive upper bound.
        positive: the value must be > 0.
        below: an exclusive upper bound.
        choices: the values of a str field (an enum flag).
        item: the type of a tuple field's items (a list flag's values).
    """
    metadata = {HELP: help, FLAG: flag, LOWER: lower, UPPER: upper, POSITIVE: positive, BELOW: below,
                CHOICES: tuple(choices) if choices else None, ITEM: item}
    return dataclasses.field(default=default, metadata=metadata)


def flag_names(config_type: type) -> dict[str, str]:
    """field -> flag name, for the fields declared with ``setting``."""
    return {f.name: f.metadata.get(FLAG) or f.name for f in dataclasses.fields(config_type) if HELP in f.metadata}


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    return typing.get_origin(hint) or hint


def _bounds_text(meta: Mapping[str, Any]) -> str:
    parts = [f"≥ {meta[LOWER]:g}" if meta[LOWER] is not None else "", "> 0" if meta[POSITIVE] else "",
             f"≤ {meta[UPPER]:g}" if meta[UPPER] is not None else "",
             f"< {meta[BELOW]:g}" if meta[BELOW] is not None else ""]
    return " and ".join(p for p in parts if p)


def _in_bounds(value: Any, meta: Mapping[str, Any]) -> bool:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None or isinstance(v, str):
            continue
        if ((meta[LOWER] is not None and not v >= meta[LOWER]) or (meta[POSITIVE] and not v > 0)
                or (meta[UPPER] is not None and not v <= meta[UPPER]) or (meta[BELOW] is not None and not v < meta[BELOW])):
            return False
    return True


def define_flags(config_type: type, *, defaults: Any = None,
                 flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """Defines a flag per ``setting`` field of ``config_type`` in ``flag_values``, with the values
    of ``defaults`` (an instance; the fields' defaults if None) and the fields' bounds as
    validators; returns flag name -> holder."""
    hints = typing.get_type_hints(config_type)
    preset = defaults if defaults is not None else config_type()
    holders = {}
    for field in dataclasses.fields(config_type):
        meta = field.metadata
        if HELP not in meta:
            continue
        name, default, kind = meta[FLAG] or field.name, getattr(preset, field.name), _base_type(hints[field.name])
        into = {"flag_values": flag_values}
        if meta[CHOICES]:
            holder = flags.DEFINE_enum(name, default, list(meta[CHOICES]), meta[HELP], **into)
        elif kind in (tuple, list):
            holder = flags.DEFINE_list(name, None if default is None else [str(v) for v in default], meta[HELP], **into)
        elif kind is bool:
            holder = flags.DEFINE_boolean(name, default, meta[HELP], **into)
        elif kind is int:
            holder = flags.DEFINE_integer(name, default, meta[HELP], **into)
        elif kind is float:
            holder = flags.DEFINE_float(name, default, meta[HELP], **into)
        else:
            holder = flags.DEFINE_string(name, default, meta[HELP], **into)
        bounds = _bounds_text(meta)
        if bounds:
            flags.register_validator(name, lambda v, meta=meta: _in_bounds(v, meta),
                                     message=f"--{name} must be {bounds}", flag_values=flag_values)
        holders[name] = holder
    return holders


def config_values(config_type: type, holders: Mapping[str, flags.FlagHolder]) -> dict[str, Any]:
    """The ``setting`` fields' values from their flags (list flags as tuples of the fields' item
    type), by field name.

    Raises:
        LaunchError: for a list flag's value that is not of its item type.
    """
    values = {}
    for field in dataclasses.fields(config_type):
        name = field.metadata.get(FLAG) or field.name
        if HELP not in field.metadata or name not in holders:
            continue
        value = holders[name].value
        if isinstance(value, list):
            item = field.metadata[ITEM]
            try:
                value = tuple(item(v) for v in value)
            except ValueError:
                value = None
            if value is None or not _in_bounds(list(value), field.metadata):
                bounds = _bounds_text(field.metadata)
                raise LaunchError(f"--{name} must be a comma-separated list of {item.__name__}s"
                                  f"{' ' + bounds if bounds else ''}, got {','.join(holders[name].value)!r}.")
        values[field.name] = value
    return values


def given_flags(holders: Mapping[str, flags.FlagHolder]) -> dict[str, Any]:
    """The flags given on the command line (and by --flagfile), by name: what a run records as its
    command (the defaults are in its config)."""
    return {name: holder.value for name, holder in holders.items() if holder.present}


def in_flag_names(message: str, names: Mapping[str, str]) -> str:
    """``message`` with the configuration fields it names written as the flags ``names`` maps
    them to: quoted (```field```, ```field=value```, ```field > 0```) or bare with a value or a
    bound (``field=value``, ``field > 0``): ``--flag``, ``--flag=value``, ``--noflag`` for
    ``=False``."""
    def flag(field: str, value: Optional[str], rest: str) -> Optional[str]:
        if field not in names:
            return None
        name = names[field]
        if value in ("True", "False"):
            return f"--{'' if value == 'True' else 'no'}{name}{rest}"
        return f"--{name}{'' if value is None else '=' + value}{rest}"

    def quoted(match: re.Match) -> str:
        return flag(match.group(1), match.group(3), match.group(4)) or match.group(0)

    def bare(match: re.Match) -> str:
        return flag(match.group(1), match.group(2), match.group(3) or "") or match.group(0)
    message = re.sub(r"`([A-Za-z_]\w*)(=([^`\s]*))?([^`]*)`", quoted, message)
    return re.sub(r"(?<![\w`-])([A-Za-z_]\w*)(?:=([\w.+-]+)|( ?[<>]=? ?-?\d[\w.]*))", bare, message)


@contextlib.contextmanager
def user_errors(names: Mapping[str, str] = {}, prefix: str = "") -> Iterator[None]:
    """Turns the ``ValueError`` / ``FileNotFoundError`` of a bad setting or missing data raised
    in the block into a ``LaunchError`` in flag names (``prefix`` before the message)."""
    try:
        yield
    except LaunchError:
        raise
    except (ValueError, FileNotFoundError, workdir.LockedError) as error:
        raise LaunchError(prefix + in_flag_names(str(error), names)) from None


def _not_checkpoint_chatter(record: Any) -> bool:
    """False for TensorFlow's log line at every checkpoint save ("Sharding callback duration")."""
    return not record.pathname.endswith("functional_saver.py")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _exit(kind: str, message: str, code: int) -> None:
    sys.stderr.write(f"{kind}: {_one_line(message)}\n")
    sys.stderr.flush()
    sys.exit(code)


def _parse(argv: list[str]) -> list[str]:
    """absl's parsing, its errors in one line (absl adds help hints after them)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _exit("Error", str(error), 1)
        raise  # unreachable: _exit exits


def run(main: Callable[[], Any], names: Mapping[str, str] = {}) -> None:
    """Parses the command line and runs ``main()`` (see the module docstring); ``names`` maps
    configuration fields to flags in the messages (and ``resume`` to ``--resume``)."""
    names = {"resume": "resume", **names}

    def entry(argv: Sequence[str]) -> None:
        logging.get_absl_logger().addFilter(_not_checkpoint_chatter)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _terminate)
        try:
            if len(argv) > 1:
                raise LaunchError(f"Unexpected arguments: {list(argv[1:])} (flags are --name=value).")
            main()
        except (LaunchError, workdir.ConfigMismatchError, workdir.LockedError) as error:
            _exit("Error", in_flag_names(str(error), names), 1)
        except DivergenceError as error:
            _exit("Diverged", f"{error} Relaunch with smaller learning rates.", 1)
        except callbacks.Interrupted as error:
            _exit("Interrupted", str(error), 128 + error.signum)
        except KeyboardInterrupt as error:
            signum = getattr(error, "signum", signal.SIGINT)
            _exit("Interrupted", f"{signal.Signals(signum).name}: stopped where nothing more was to be saved; the "
                  f"run's last checkpoint is kept, and the same command resumes it.", 128 + signum)
    app.run(entry, flags_parser=_parse)


def define_run_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """The flags of every launcher's run: ``--logdir`` (required), ``--resume`` and
    ``--checkpoint_seconds``."""
    return dict(
        logdir=flags.DEFINE_string("logdir", None, "Output folder (created if missing).", required=True,
                                   flag_values=flag_values),
        resume=flags.DEFINE_boolean("resume", True, "Continue the run saved in --logdir (a run with other "
                                    "settings is an error); --noresume deletes it and starts afresh.",
                                    flag_values=flag_values),
        checkpoint_seconds=flags.DEFINE_float("checkpoint_seconds", 60.0, "Seconds between checkpoints (also "
                                              "written at the end and on Ctrl-C/SIGTERM): at most this much "
                                              "work is lost if the process is killed.", lower_bound=0.0,
                                              flag_values=flag_values))
