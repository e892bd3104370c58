"""``python -m dynamo_ext.launch.prepare_model --config FILE --link PATH``: the model directory of a config, at a
fixed path.

What a Kubernetes pod of ``dynamo-ext deploy render`` runs as its init container (``model``): the same
``modeldir.ensure_model_dir`` as ``dynamo-ext serve`` (``model.path`` checked, a random-weight preset generated,
an imported preset imported into ``$DYNAMO_EXT_CACHE``, a complete directory reused), then ``PATH`` becomes a
symbolic link to that directory, so the main container's command can name one path whatever the preset and
package version (``--model-dir PATH``). Prints the directory on stdout, progress on stderr. Exit 0 done,
2 a bad config, a model directory that cannot be had, or a ``PATH`` that exists and is not a link.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dynamo_ext.config import ConfigError, load_config

from .modeldir import ModelDirError, ensure_model_dir


def link_model_dir(config_path: str, link: str | Path) -> Path:
    """``link`` -> the config's model directory (made or reused); the directory. Raises ``ConfigError``,
    ``ModelDirError`` or ``FileExistsError``."""
    config = load_config(config_path)
    target, how = ensure_model_dir(config.model, progress=lambda s: print(f"[model] {s}", file=sys.stderr, flush=True))
    link = Path(link)
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"--link {link}: exists and is not a symbolic link")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)
    print(f"[model] {config.model.name}: {target} ({how}) -> {link}", file=sys.stderr, flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_ext.launch.prepare_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="dynamo.yaml")
    p.add_argument("--link", required=True, help="path of the symbolic link to the model directory")
    a = p.parse_args(argv)
    try:
        target = link_model_dir(a.config, a.link)
    except ConfigError as e:
        for line in e.lines:
            print(f"{e.source}: {line}", file=sys.stderr)
        return 2
    except (ModelDirError, FileExistsError) as e:
        print(f"prepare_model: {e}", file=sys.stderr)
        return 2
    except (ImportError, OSError, ValueError) as e:
        print(f"prepare_model: cannot generate or import the model directory: {e}", file=sys.stderr)
        return 2
    print(target)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
