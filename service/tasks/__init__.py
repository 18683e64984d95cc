"""Built-in training tasks and their registry.

Each task builds a model, a training dataset, a loss and an evaluation metric
(:class:`zerotrain.service.tasks.base.Task`). Built-ins need no downloads:

* ``digits``: scikit-learn's bundled 8x8 digits (real data), MLP classifier.
* ``charlm``: a small character-level transformer over the Python standard
  library's own source files.
* ``regression``: synthetic teacher-student regression, sized for benchmarks.
"""

from zerotrain.service.tasks.args import Arg
from zerotrain.service.tasks.registry import (
    TaskDef,
    get_task,
    is_custom_task,
    list_tasks,
    register_task,
)

__all__ = ["Arg", "TaskDef", "get_task", "is_custom_task", "list_tasks", "register_task"]

register_task(
    "digits",
    builder="zerotrain.service.tasks.digits:build",
    description="scikit-learn digits (8x8 images, 10 classes), MLP classifier",
    args={
        "hidden": Arg(type=int, default=128, min=1, max=4096, doc="hidden layer width"),
        "depth": Arg(type=int, default=2, min=1, max=16, doc="number of hidden layers"),
        "test_fraction": Arg(
            type=float, default=0.2, min=0.05, max=0.5, doc="held-out fraction for accuracy"
        ),
    },
)


def _check_charlm(args: dict) -> list[str]:
    if args["d_model"] % args["n_heads"]:
        return [
            f"task_args.n_heads: must divide task_args.d_model ({args['d_model']}), "
            f"got {args['n_heads']}"
        ]
    return []


register_task(
    "charlm",
    check=_check_charlm,
    builder="zerotrain.service.tasks.charlm:build",
    description="character-level transformer LM over the Python standard library sources",
    args={
        "corpus": Arg(
            type=str,
            default="stdlib",
            choices=("stdlib",),
            doc="built-in corpus: the standard library's top-level *.py files",
        ),
        "max_chars": Arg(
            type=int, default=1_000_000, min=10_000, max=50_000_000, doc="corpus size cap"
        ),
        "context": Arg(type=int, default=64, min=8, max=2048, doc="sequence length"),
        "d_model": Arg(type=int, default=64, min=8, max=4096, doc="embedding width"),
        "n_layers": Arg(type=int, default=2, min=1, max=48, doc="transformer blocks"),
        "n_heads": Arg(type=int, default=4, min=1, max=64, doc="attention heads"),
    },
)
register_task(
    "regression",
    builder="zerotrain.service.tasks.regression:build",
    description="synthetic regression against a fixed random teacher MLP",
    args={
        "in_features": Arg(type=int, default=32, min=1, max=65536, doc="input width"),
        "hidden": Arg(type=int, default=256, min=1, max=65536, doc="student hidden width"),
        "depth": Arg(type=int, default=2, min=1, max=64, doc="student hidden layers"),
        "out_features": Arg(type=int, default=1, min=1, max=65536, doc="output width"),
        "num_samples": Arg(type=int, default=8192, min=16, max=10_000_000, doc="dataset size"),
        "noise": Arg(type=float, default=0.01, min=0.0, max=10.0, doc="label noise std"),
    },
)
