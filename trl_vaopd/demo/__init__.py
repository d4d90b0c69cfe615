"""The built-in offline demo, and the tasks, models and distillation runs the small-scale replication builds on.

- `trl_vaopd.demo.task`: two synthetic visual-reasoning tasks on the same tiny figures of a rectangle, its area (the
  student already writes the teacher's template) and its perimeter (a long-reasoning teacher, the papers' regime);
- `trl_vaopd.demo.models`: a tiny Qwen3-VL teacher and student trained on a task, on CPU, and cached on disk;
- `trl_vaopd.demo.experiment`: one distillation run under standard OPD, VA-OPD, VGS, ViCuR, their ablations or a KL
  mask;
- `trl_vaopd.demo.regime`: where the KL sits at the start of distillation, and VGS's counterfactual terms
  (`python -m trl_vaopd.demo regime`);
- `trl_vaopd.demo.pipeline`: `run_demo()`, what `python examples/train_vaopd.py` runs with no argument.

`python -m trl_vaopd.demo` runs the demo too; `examples/replicate.py` runs the replication.
"""

from .pipeline import run_demo


__all__ = ["run_demo"]
