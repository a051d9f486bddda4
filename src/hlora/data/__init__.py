from .base import DataError, MCQItem
from .tasks import TASK_NAMES, get_task

__all__ = ["DataError", "MCQItem", "TASK_NAMES", "get_task"]
