"""Pushing from sync code (a Flask view, a Django command, a script) with push_sync, and waiting with wait_sync.

Nothing on the producer's side runs an event loop. The worker is a separate process,
``beanie-tasks worker sync_producer``, as it would be in production.
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pymongo import MongoClient

import beanie_tasks.sync
from beanie_tasks import Task
from beanie_tasks.embedded import server_uri

HERE = Path(__file__).resolve().parent
DATABASE = "example_sync_producer"


class Thumbnail(Task):
    path: str

    def run(self) -> str:  # a plain def: the worker runs it in a thread
        return f"thumbnails/{Path(self.path).name}"


def produce(uri: str) -> list[Thumbnail]:
    # Once per process (at app start-up). A URI naming the database (mongodb://host/myapp) needs no database=.
    beanie_tasks.sync.init(uri, document_models=[Thumbnail], database=DATABASE)

    pushed: list[Thumbnail] = []

    def handle_upload(path: str) -> None:  # a web server's request thread
        pushed.append(Thumbnail(path=path, dedupe_key=path).push_sync())

    threads = [threading.Thread(target=handle_upload, args=(f"uploads/photo{i}.jpg",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    twin = Thumbnail(path="uploads/photo0.jpg", dedupe_key="uploads/photo0.jpg").push_sync()
    assert twin.id in {task.id for task in pushed}  # the same upload twice: one task
    return pushed


def drop(uri: str) -> None:
    with MongoClient(uri) as client:
        client.drop_database(DATABASE)


def main(uri: str) -> None:
    drop(uri)
    pushed = produce(uri)
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"MONGODB_URI": uri, "MONGODB_DATABASE": DATABASE, "PYTHONPATH": path}
    worker = subprocess.Popen([sys.executable, "-m", "beanie_tasks.cli", "worker", "sync_producer"], cwd=HERE, env=env)
    try:
        for task in pushed:
            done = task.wait_sync(timeout=60)  # raises TaskFailed or WaitTimeout, as wait() does
            print(f"{task.path} -> {done.result}")
            assert done.result == f"thumbnails/{Path(task.path).name}"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    beanie_tasks.sync.close()
    drop(uri)


if __name__ == "__main__":
    with server_uri() as uri:
        main(uri)
