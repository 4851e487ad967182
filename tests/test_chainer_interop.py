"""Real Chainer 7.8.1 objects through gpuserial's serializers, in Chainer's own environment.

``tests/data/chainer/resume_pairings.py`` runs there (``ci/test.sh`` builds it, with gpuserial
installed beside Chainer, and names its python in GPUSERIAL_CHAINER_PYTHON). One process trains
Chainer trainers and saves their snapshots with each saver; a new process loads each snapshot
with each loader into fresh objects and trains on. Every pairing must give exactly the state
that Chainer -> Chainer gives: parameters, optimizer state, iterator, triggers, log, bit for bit.
"""

import json
import pathlib
import subprocess

import pytest

from tests.conftest import CHAINER_PYTHON

SCRIPT = pathlib.Path(__file__).parent / 'data' / 'chainer' / 'resume_pairings.py'
OPTIMIZERS = ['adam', 'momentum_sgd', 'rmsprop', 'adadelta']
# variant: (the parties that can save and load it, the Chainer -> Chainer run it must match)
VARIANTS = {'npz': (['chainer', 'gpuserial'], 'npz'),
            'hdf5': (['chainer', 'gpuserial'], 'hdf5'),
            'hdf5-log': (['gpuserial'], 'npz')}  # Chainer's HDF5 cannot store LogReport's text
CASES = [f'{variant}/{name}/{saver}->{loader}' for variant, (parties, _) in VARIANTS.items()
         for name in OPTIMIZERS for saver in parties for loader in parties]
CHECKS = ['classes', 'device_specs', 'uninitialized_link_with_device',
          'dtype_mismatch_is_a_type_error', 'hdf5_compression_as_chainer',
          'partial_loads_as_chainer', 'multiprocess_iterator_resumes',
          'snapshot_writers_save_hdf5_with_a_lazy_link', 'library_call_patterns',
          'import_does_not_import_chainer']

pytestmark = pytest.mark.chainer


def _run(command: str, directory) -> dict:
    result = subprocess.run([CHAINER_PYTHON, str(SCRIPT), command, str(directory)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope='module')
def pairings(tmp_path_factory):
    directory = tmp_path_factory.mktemp('pairings')
    assert _run('save', directory) == {}  # no saver failed
    return _run('resume', directory)  # a new process


def test_every_pairing_ran(pairings):
    assert sorted(pairings) == sorted(CASES)


@pytest.mark.parametrize('case', CASES)
def test_pairing_resumes_as_chainer_does(pairings, case):
    variant, name, _ = case.split('/')
    reference = pairings[f'{VARIANTS[variant][1]}/{name}/chainer->chainer']
    got = pairings[case]
    assert 'error' not in got, got['error']
    assert 'error' not in reference, reference['error']
    assert got['loaded'] == reference['loaded']
    assert got['resumed'] == reference['resumed']
    assert got['loaded'] != got['resumed']  # it trained on from there
    assert all(got['loaded'][key] == 'False' for key in got['loaded']
               if key.startswith('state-is-none'))  # the optimizer state was loaded


@pytest.fixture(scope='module')
def checks(tmp_path_factory):
    return _run('checks', tmp_path_factory.mktemp('checks'))


def test_every_check_ran(checks):
    assert sorted(checks) == sorted(CHECKS)


@pytest.mark.parametrize('name', CHECKS)
def test_drop_in_check(checks, name):
    assert checks[name] is None, checks[name]
