"""The worker threads that deflate and inflate: how many, and where none may be used."""

import os
import subprocess
import sys

import pytest

from gpuserial.engine import workers

COUNT = 'from gpuserial.engine import workers; print(workers.count())'


def _count(**environment) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != workers.THREADS_VARIABLE}
    return subprocess.run([sys.executable, '-c', COUNT], env=dict(env, **environment),
                          capture_output=True, text=True)


def test_one_thread_a_cpu_ours_at_most_eight_unless_the_variable_says():
    cpus = len(os.sched_getaffinity(0))
    assert _count().stdout.split() == [str(min(cpus, workers.MAX_THREADS))]
    assert _count(GPUSERIAL_THREADS='12').stdout.split() == ['12']
    assert _count(GPUSERIAL_THREADS='1').stdout.split() == ['1']
    for wrong in ('0', '-2', 'many'):
        refused = _count(GPUSERIAL_THREADS=wrong)
        assert refused.returncode != 0
        assert f"GPUSERIAL_THREADS={wrong!r}: expected a positive number" in refused.stderr


def test_with_one_thread_or_inside_a_submit_the_caller_does_the_work(monkeypatch):
    monkeypatch.setattr(workers, 'count', lambda: 1)
    assert workers.submit(sum, [1, 2]) is None
    monkeypatch.setattr(workers, 'count', lambda: 2)
    future = workers.submit(sum, [1, 2])
    assert future is not None and future.result() == 3
    monkeypatch.setattr(workers.submitting, 'active', True)  # a signal handler's save
    assert workers.submit(sum, [1, 2]) is None


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='Linux only')
def test_the_cpus_this_process_may_use_count_not_the_machines():
    script = ('import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); ' + COUNT)
    assert subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items()
                               if k != workers.THREADS_VARIABLE}).stdout.split() == ['1']
