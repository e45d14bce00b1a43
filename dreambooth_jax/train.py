"""DreamBooth fine-tuning: `python -m dreambooth_jax.train --config sd15 --instance_data_dir ... ...`.

Parses the options, runs `dreambooth_jax.training.trainer.run`, reports. With `--dry_run`, the memory
preflight is the last line of stdout, one JSON object.
"""

from __future__ import annotations

import json
import sys
import time

from dreambooth_jax import parallel
from dreambooth_jax.cli import setup_logging
from dreambooth_jax.training.config import parse_args
from dreambooth_jax.training.trainer import run


def main(argv=None) -> None:
    cfg = parse_args(argv)
    setup_logging()
    t0 = time.perf_counter()
    result = run(cfg)
    if cfg.dry_run:
        if parallel.is_main_process():
            print(json.dumps(result.summary["preflight"]), flush=True)  # the last line of stdout: for tools
        return
    if parallel.is_main_process():
        s = result.summary
        where = (f"{len(s['subjects'])} subjects' results in {result.output_dir}/<name>" if "subjects" in s
                 else f"pipeline in {result.output_dir}")
        print(f"done: {result.steps} steps in {time.perf_counter() - t0:.0f}s "
              f"(compile {s.get('compile_s', 0):.1f}s, {s.get('samples_per_s', 0):.2f} samples/s, "
              f"peak memory {s.get('peak_memory', 'n/a')}); {where}", file=sys.stderr)


if __name__ == "__main__":
    from dreambooth_jax import cli

    cli.run_main(main)
