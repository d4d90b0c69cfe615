"""The built-in offline demo and the small-scale replication of VA-OPD.

- `trl_vaopd.demo.task`: a synthetic visual-reasoning task (the area of a rectangle read off a tiny figure);
- `trl_vaopd.demo.models`: a tiny Qwen3-VL teacher and student trained on it, on CPU, and cached on disk;
- `trl_vaopd.demo.experiment`: one distillation run under standard OPD, VA-OPD, its ablations or a KL mask;
- `trl_vaopd.demo.pipeline`: `run_demo()`, what `python examples/train_vaopd.py` runs with no argument.

`python -m trl_vaopd.demo` runs the demo too.
"""

from .pipeline import run_demo


__all__ = ["run_demo"]
