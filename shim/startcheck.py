"""Why an engine's command cannot run, said before it is started and read
from the unit's exit status after.

Pure logic apart from looking at files: `problems` takes the command line
and the PATH the unit will have; `exit_cause` maps systemd's exit status of
the unit's main process to words. Both name the engine and the key to fix.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence

# systemd's own exit statuses for a process it could not set up
# (systemd.exec(5), "Process Exit Codes"); 126/127 are the shells'.
_EXIT_CAUSES = {
    200: "systemd could not change to its working directory (200/CHDIR)",
    203: "systemd could not execute it (203/EXEC: not found, not executable, or a bad interpreter line)",
    217: "systemd could not switch to its user (217/USER)",
    126: "its command could not be executed (126: permission denied?)",
    127: "its command was not found (127)",
}
# waitid(2)'s code for a process that exited (rather than was killed)
CLD_EXITED = 1
# vLLM's subcommands that take a model: `vllm serve MODEL`.
_MODEL_SUBCOMMANDS = ("serve",)


def unit_path(environment: Mapping[str, str], inherited: Mapping[str, str] | None = None) -> str:
    """The PATH the engine's unit gets: its own `environment`, else the
    user manager's (the shim runs under the same manager, so its own)."""
    env = os.environ if inherited is None else inherited
    return environment.get("PATH") or env.get("PATH") or os.defpath


def problems(engine: str, argv: Sequence[str], path: str) -> list[str]:
    """What stops this command from running, as sentences; [] when nothing is seen."""
    if not argv:
        return [f"the engine {engine!r} has no command (set engines.{engine}.command)"]
    found: list[str] = []
    exe = argv[0]
    key = f"engines.{engine}.command"
    if "/" in exe:
        full = os.path.expanduser(exe)
        if not os.path.exists(full):
            found.append(f"the engine's command {exe!r} does not exist (fix {key})")
        elif os.path.isdir(full) or not os.access(full, os.X_OK):
            found.append(f"the engine's command {exe!r} is not executable: permission denied (fix {key})")
    elif shutil.which(exe, path=path) is None:
        hint = "install vLLM, or set" if exe == "vllm" else "install it, or set"
        found.append(f"the engine's command {exe!r} was not found in the PATH of the engine's unit "
                     f"({path}) ({hint} {key} to its full path)")
    model = _model_argument(argv)
    if model is not None and _looks_like_a_folder(model) and not os.path.isdir(os.path.expanduser(model)):
        found.append(f"the model folder {model!r} does not exist (fix {key})")
    return found


def exit_cause(code: int, status: int) -> str | None:
    """systemd's ExecMainCode (a CLD_* code) and ExecMainStatus, in words;
    None when the status says nothing about the command itself."""
    if code == CLD_EXITED and status in _EXIT_CAUSES:
        return _EXIT_CAUSES[status]
    return None


def _model_argument(argv: Sequence[str]) -> str | None:
    """`vllm serve MODEL ...`: the model, when given as a positional argument."""
    if len(argv) >= 3 and os.path.basename(argv[0]) == "vllm" and argv[1] in _MODEL_SUBCOMMANDS:
        model = argv[2]
        return None if model.startswith("-") else model
    return None


def _looks_like_a_folder(model: str) -> bool:
    """A path rather than a Hugging Face name ("org/name" is a name)."""
    return model.startswith(("/", "./", "../", "~"))
