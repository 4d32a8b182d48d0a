"""One process of a multi-process `difflax` command, for tests/test_multihost.py.

    python tests/multihost_worker.py DELAY -- [--coordinator ...] COMMAND ARGS...

DELAY (seconds) slows each training batch so that a test can kill the run mid-way.
"""
import sys
import time

from difflax import cli, data


def slowed(batch_iterator, delay):
    def batches(*args, **kwargs):
        for batch in batch_iterator(*args, **kwargs):
            time.sleep(delay)
            yield batch

    return batches


if __name__ == "__main__":
    delay, argv = float(sys.argv[1]), sys.argv[3:]
    if delay:
        data.batch_iterator = slowed(data.batch_iterator, delay)
    sys.exit(cli.main(argv))
