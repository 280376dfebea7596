"""The web dashboard (the ``web`` extra): ``app.mount("/tasks", dashboard([MyTask, ...]))``."""

from beanie_tasks.web.app import dashboard

__all__ = ["dashboard"]
