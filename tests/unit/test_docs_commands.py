"""Every command shown in a code block of README.md or docs/*.md still parses.

Commands are read from the fenced code blocks (continuation lines joined, comments and leading ``VAR=value``
assignments dropped, ``$VAR`` expanded from assignments earlier in the same block):

- ``python -m sparselm.X`` and ``python[3] tools/X.py``: their argument parser parses the documented
  arguments (the parse is intercepted before the command does any work), unknown ``--section.key=value``
  overrides are loaded into a config, and each distinct target also answers ``--help``;
- ``deepspeed ... --module sparselm.train`` and ``torchrun ... -m sparselm.train``: the launcher's own parser
  takes its options and finds the module, whose arguments are then checked as ``python -m sparselm.train``'s;
- ``python -m sparselm.train`` and ``sbatch ... slurm/X``: ``sparselm.train.parse_args`` and ``load_config``
  with the documented preset and overrides (not validated as a whole: that needs the launcher's world);
- ``make X``: a Makefile target; ``sbatch``: the script exists; presets and ``parallel.ds_config`` names exist.

All parsing happens in one subprocess (this file run as a script), since every start pays the imports.
Placeholders written in capitals (``--config NAME``, ``--train.steps=N``) get a sample value.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDERS = {"NAME": "tiny_dense", "PREFIX": "data/corpus", "N": "2", "T": "1", "P": "1", "E": "1", "M": "1",
                "GIB": "80"}
# lines that are commands this test knows how to check
COMMAND = re.compile(r"^(python3? |deepspeed |torchrun |make |sbatch )")


def _expand_placeholders(token: str) -> str:
    key, eq, value = token.rpartition("=")
    if eq and value in PLACEHOLDERS:
        return f"{key}={PLACEHOLDERS[value]}"
    return PLACEHOLDERS.get(token, token)


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for each command line in a fenced code block, ``where`` being ``file:line``."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().split("\n")
        in_code, variables, i = False, {}, 0
        while i < len(lines):
            start, text = i, lines[i].strip()
            i += 1
            if text.startswith("```"):
                in_code, variables = not in_code, {}
                continue
            if not in_code:
                continue
            while text.endswith("\\") and i < len(lines):
                text, i = text[:-1] + " " + lines[i].strip(), i + 1
            bare = re.sub(r"^([A-Z_][A-Z0-9_]*=(\"[^\"]*\"|\S*)\s*)+", "", text)
            if bare and not COMMAND.match(bare + " "):
                continue  # not a command (output, a file listing, YAML)
            # a synopsis marks optional parts with [...] and open-ended ones with ...
            text = text.replace("[--section.key=value ...]", "").replace("[", "").replace("]", "")
            try:
                argv = shlex.split(text, comments=True)
            except ValueError as err:
                found.append((f"{doc.name}:{start + 1}", ["<unparsable>", str(err)]))
                continue
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                name, _, value = argv.pop(0).partition("=")
                variables[name] = value
            argv = [word for a in argv
                    for word in (shlex.split(variables[a[1:]]) if a.startswith("$") and a[1:] in variables else [a])]
            argv = [_expand_placeholders(a) for a in argv if a != "..."]
            if argv and COMMAND.match(" ".join(argv) + " "):
                found.append((f"{doc.relative_to(REPO)}:{start + 1}", argv))
    return found


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))


# --------------------------------------------------------------------------------------------- the driver
class _Parsed(BaseException):
    """Raised by the outermost argparse call once it has parsed: the command stops before doing anything."""

    def __init__(self, namespace, extras):
        super().__init__()
        self.namespace, self.extras = namespace, extras


@contextlib.contextmanager
def _stop_after_parsing():
    import argparse

    depth = [0]
    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")}

    def wrap(name):
        def parse(self, args=None, namespace=None):
            depth[0] += 1
            try:
                result = originals[name](self, args, namespace)
            finally:
                depth[0] -= 1
            if depth[0]:  # a subparser, or parse_args calling parse_known_args: let the outer call finish
                return result
            ns, extras = result if name == "parse_known_args" else (result, [])
            raise _Parsed(ns, extras)
        return parse

    for name in originals:
        setattr(argparse.ArgumentParser, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(argparse.ArgumentParser, name, fn)


def _run_target(target: str, argv: list[str]):
    """Run ``python -m target`` / ``python target`` in this process with ``argv``."""
    import runpy

    sys.argv = [target, *argv]
    if target.endswith(".py"):
        runpy.run_path(str(REPO / target), run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


def _check_overrides(overrides: list[str]) -> None:
    from sparselm.config import load_config

    if overrides:
        load_config(None, overrides, check=False)


def _check_train(argv: list[str]) -> None:
    """``sparselm.train``'s own parse, then the preset or YAML and the overrides loaded into a config."""
    from sparselm.config import load_config, resolve_preset
    from sparselm.train import parse_args

    name, overrides = parse_args(argv)
    if name is None:
        raise AssertionError("no --config")
    made_earlier = name.endswith((".yaml", ".yml")) and not (REPO / name).is_file()  # e.g. import-hf's output
    if not made_earlier:
        resolve_preset(name)
    load_config(None if made_earlier else name, overrides, check=False)
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key == "--parallel.ds_config" and not value.endswith(".json"):
            assert (REPO / "ds_configs" / f"{value}.json").is_file(), f"no ds_configs/{value}.json"


def _check_argparse_target(target: str, argv: list[str]) -> None:
    with _stop_after_parsing():
        try:
            _run_target(target, argv)
        except _Parsed as parsed:
            _check_overrides([a for a in parsed.extras if a.startswith("--") and "." in a.split("=")[0]])
            leftover = [a for a in parsed.extras if not (a.startswith("--") and "." in a.split("=")[0])]
            assert not leftover, f"arguments neither the parser nor the config takes: {leftover}"
            return
    raise AssertionError(f"{target} returned without parsing arguments")


def _check_bench_offload(argv: list[str]) -> None:
    import runpy

    tool = runpy.run_path(str(REPO / "tools/bench_offload.py"), run_name="bench_offload")  # its own parser
    config, _steps, _runs, _child, overrides, _largest = tool["_parse"](argv)
    from sparselm.config import load_config

    load_config(config, overrides, check=False)


def _check(argv: list[str]) -> None:
    if argv[0] == "<unparsable>":
        raise AssertionError(f"not a shell command line: {argv[1]}")
    prog, args = argv[0], argv[1:]
    if prog == "make":
        missing = [t for t in args if t not in make_targets()]
        assert not missing, f"no Makefile target {missing}"
    elif prog == "sbatch":
        scripts = [a for a in args if a.startswith("slurm/")]
        assert len(scripts) == 1, "no slurm/ script named"
        assert (REPO / scripts[0]).is_file(), f"{scripts[0]} does not exist"
        _check_train(args[args.index(scripts[0]) + 1:])
    elif prog == "deepspeed":
        from deepspeed.launcher.runner import parse_args as deepspeed_args

        ns = deepspeed_args(args)
        assert ns.module and ns.user_script == "sparselm.train", "the launcher does not start --module sparselm.train"
        _check_train(ns.user_args)
    elif prog == "torchrun":
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args(args)
        assert ns.module and ns.training_script == "sparselm.train", "torchrun does not start -m sparselm.train"
        _check_train(ns.training_script_args)
    elif prog in ("python", "python3"):
        if args[:1] == ["-m"]:
            target, rest = args[1], args[2:]
            assert (REPO / (target.replace(".", "/") + ".py")).is_file(), f"no module {target}"
        else:
            target, rest = args[0], args[1:]
            assert (REPO / target).is_file(), f"no script {target}"
        if target == "sparselm.train":
            _check_train(rest) if "--help-config" not in rest else _check_help(target)
        elif target == "tools/bench_offload.py":
            _check_bench_offload(rest)
        else:
            _check_argparse_target(target, rest)
    else:
        raise AssertionError(f"no rule for {prog}")


def _check_help(target: str) -> None:
    """``--help`` answers with status 0 (``sparselm.train``: its own parse_args; bench_offload has no --help)."""
    if target == "tools/bench_offload.py":
        return
    argv = ["--help"]
    try:
        if target == "sparselm.train":
            from sparselm.train import parse_args

            parse_args(argv)
        else:
            _run_target(target, argv)
    except SystemExit as stop:
        assert stop.code in (0, None), f"{target} --help exited with {stop.code}"
        return
    raise AssertionError(f"{target} --help did not exit")


def drive(jobs: dict[str, list[str]]) -> dict[str, str]:
    """Check each command in this process; returns '' for a pass, else the failure, by job name."""
    os.chdir(REPO)
    sys.path[:0] = [str(REPO)]
    results = {}
    for name, argv in jobs.items():
        out, err = io.StringIO(), io.StringIO()
        sys.argv = argv[:1]  # usage lines name the program, not the previous one
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                if name.startswith("help:"):
                    _check_help(argv[0])
                else:
                    _check(argv)
            results[name] = ""
        except SystemExit as stop:
            results[name] = f"exited with {stop.code!r}: {err.getvalue().strip()[-800:]}"
        except BaseException as error:  # noqa: BLE001  reported per command
            results[name] = f"{type(error).__name__}: {error} {err.getvalue().strip()[-400:]}"
    return results


# ---------------------------------------------------------------------------------------------- the tests
COMMANDS = doc_commands()


def _targets() -> list[str]:
    targets = set()
    for _, argv in COMMANDS:
        if argv[0] in ("python", "python3") and len(argv) > 1:
            targets.add(argv[2] if argv[1] == "-m" and len(argv) > 2 else argv[1])
    return sorted(targets)


def _driver_results() -> dict[str, str]:
    jobs = {where: argv for where, argv in COMMANDS}
    jobs.update({f"help:{t}": [t] for t in _targets()})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(jobs), capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"the driver failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


_RESULTS: dict[str, str] = {}


def _result(name: str) -> str:
    if not _RESULTS:
        _RESULTS.update(_driver_results())
    return _RESULTS[name]


def test_commands_found():
    """The reader keeps finding the commands (a change to the fences or the patterns would silently check nothing)."""
    progs = {argv[0] for _, argv in COMMANDS}
    assert {"python", "deepspeed", "torchrun", "make", "sbatch"} <= progs, progs
    assert len(COMMANDS) > 50


def pytest_generate_tests(metafunc):
    if "command" in metafunc.fixturenames:
        metafunc.parametrize("command", [where for where, _ in COMMANDS])
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", _targets())


def test_command_parses(command):
    argv = dict(COMMANDS)[command]
    failure = _result(command)
    assert not failure, f"{command}: `{shlex.join(argv)}`\n{failure}"


def test_help(target):
    failure = _result(f"help:{target}")
    assert not failure, f"{target} --help: {failure}"


def test_referenced_files_exist():
    """slurm/ scripts, ds_configs and presets named anywhere in the prose exist."""
    presets = {p.stem for p in (REPO / "sparselm" / "configs").glob("*.yaml")}  # no import: keeps torch out of pytest
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for path in re.findall(r"\bslurm/[\w.-]+\.(?:sh|sbatch)\b", text):
            if not (REPO / path).is_file():
                missing.append(f"{doc.name}: {path}")
        for name in re.findall(r"parallel\.ds_config=(\w+)\b(?!\.json)", text):
            if not (REPO / "ds_configs" / f"{name}.json").is_file():
                missing.append(f"{doc.name}: ds_configs/{name}.json")
        for name in re.findall(r"--config[ =]([\w./-]+)", text):
            if name not in presets and name not in PLACEHOLDERS and not name.endswith((".yaml", ".yml")):
                missing.append(f"{doc.name}: preset {name}")
    assert not missing, missing


if __name__ == "__main__":
    print(json.dumps(drive(json.loads(sys.stdin.read()))))
