"""STS evaluation data."""

from flowkern.data.sts import (
    DATA_ENV_VAR,
    SETTINGS,
    TASKS,
    DataDirError,
    StsPairs,
    TaskSpec,
    fit_sentences,
    load_task,
    read_pairs,
    resolve_data_dir,
    task_spec,
)

__all__ = [
    "DATA_ENV_VAR",
    "SETTINGS",
    "TASKS",
    "DataDirError",
    "StsPairs",
    "TaskSpec",
    "fit_sentences",
    "load_task",
    "read_pairs",
    "resolve_data_dir",
    "task_spec",
]
