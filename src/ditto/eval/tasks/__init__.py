"""Evaluation tasks: GSM8K, MATH-500 and the synthetic `arith` generator."""

from ditto.eval.tasks.base import Problem, Task
from ditto.eval.tasks.registry import TASKS, get_task

__all__ = ["Problem", "Task", "TASKS", "get_task"]
