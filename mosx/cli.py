"""The `mosx` command: one entry point, one module per subcommand (imported only when used)."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Each module exposes main(argv: list[str]) -> int | None.
COMMANDS = {
    "demo": ("mosx.demo", "the built-in offline benchmark: train flat + grouped models, score every OOD set"),
    "train": ("mosx.train", "group-softmax / flat fine-tuning, Unleashing Mask (UM, UMAP)"),
    "eval": ("mosx.evaluate", "score ID and OOD sets with every method, paper-style table"),
    "data": ("mosx.data", "build the offline benchmark data sets"),
    "export": ("mosx.export", "export an OOD gate (model + score + calibrated threshold) to ONNX or .pt2"),
    "info": ("mosx._info", "build information: version, torch, CUDA kernels, CPU features"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mosx <command> [options]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<8} {doc}")
        print("\nrun `mosx <command> --help` for a command's options")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mosx: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
