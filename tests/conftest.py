"""The device fixture (CPU, the stand-in, real GPUs), the ``gpu`` marker's skip, the Chainer
environment the ``chainer`` tests run in, and object storage (moto's S3 server, memory://)."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import pathlib

import numpy
import pytest
from hypothesis import settings

from gpuserial import serializers
from gpuserial.engine import devices, transfer
from tests import standin

# CI's profile (.ci/run): the same examples every run, so that whether work lands is not
# decided by the draw; runs without it explore new examples each time.
settings.register_profile('ci', derandomize=True, database=None)


@pytest.fixture(scope='session', autouse=True)
def _standin_backend():
    with devices.register_backend(standin.BACKEND):
        yield


def _gpu_count() -> int:
    if not devices.gpu_available():
        return 0
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


def _chainer_python() -> str | None:
    """The python of the Chainer 7.8.1 environment (with gpuserial installed beside Chainer):
    GPUSERIAL_CHAINER_PYTHON, else the .venv-chainer that ci/test.sh builds, if it exists."""
    named = os.environ.get('GPUSERIAL_CHAINER_PYTHON')
    path = pathlib.Path(named) if named else ROOT / '.venv-chainer' / 'bin' / 'python'
    return str(path) if path.exists() else None


ROOT = pathlib.Path(__file__).resolve().parent.parent
CHAINER_PYTHON = _chainer_python()


# The test extras whose tests skip where they are missing (ci/test-oldest.sh leaves them out)
TEST_EXTRAS = ('torch', 'jax', 'safetensors', 'moto', 's3fs', 'mpi4py', 'ml_dtypes',
               'matplotlib')


def pytest_configure(config):
    missing = [name for name in TEST_EXTRAS if importlib.util.find_spec(name) is None]
    if os.environ.get('GPUSERIAL_REQUIRE_EXTRAS') == '1' and missing:
        raise pytest.UsageError(f'GPUSERIAL_REQUIRE_EXTRAS=1 but these test extras are '
                                f"missing: {', '.join(missing)} (pip install -e '.[test]')")


def pytest_collection_modifyitems(config, items):
    # JAX starts threads once imported; the tests that fork a child run before that.
    items.sort(key=lambda item: 'jax' in item.keywords)
    if CHAINER_PYTHON is None:
        if os.environ.get('GPUSERIAL_REQUIRE_CHAINER') == '1' and any(
                'chainer' in item.keywords for item in items):
            raise pytest.UsageError('GPUSERIAL_REQUIRE_CHAINER=1 but there is no Chainer '
                                    'environment (GPUSERIAL_CHAINER_PYTHON or .venv-chainer)')
        skip_chainer = pytest.mark.skip(reason='no Chainer 7.8.1 environment (ci/test.sh '
                                               'builds .venv-chainer)')
        for item in items:
            if 'chainer' in item.keywords:
                item.add_marker(skip_chainer)
    if devices.gpu_available():
        return
    skip = pytest.mark.skip(reason='no usable GPU (cupy missing or cupy.is_available() False)')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


DEVICE_PARAMS = [
    pytest.param('cpu', id='cpu'),
    pytest.param('standin:0', id='standin0'),
    pytest.param('standin:1', id='standin1'),
    pytest.param('cuda:0', id='cuda0', marks=pytest.mark.gpu),
    pytest.param('cuda:1', id='cuda1', marks=pytest.mark.gpu),
]


def make_device(spec: str) -> devices.Device:
    if spec.startswith('standin:'):
        return standin.StandInDevice(int(spec.split(':')[1]))
    if spec == 'cuda:1' and _gpu_count() < 2:
        pytest.skip('needs two GPUs')
    return devices.get_device(spec)


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> devices.Device:
    """Each place arrays can live: the CPU, two stand-in devices, and GPUs 0 and 1."""
    return make_device(request.param)


@pytest.fixture
def small_chunks():
    """Chunks of 64 bytes and 2 buffers, so that small arrays cross many chunk boundaries."""
    with transfer.configure(chunk_bytes=64, buffers=2):
        yield 64


def flatten(tree: dict, prefix: str = '') -> dict:
    """A nested dict as one dict of ``a/b`` keys."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f'{prefix}{key}/'))
        else:
            out[prefix + key] = value
    return out


def host(array) -> numpy.ndarray:
    """A NumPy copy of an array of any device, for comparisons."""
    return numpy.asarray(devices.to_host(array))


FORMATS = {
    'npz': (serializers.save_npz, serializers.load_npz, '.npz'),
    'npz-stored': (lambda f, o, **kw: serializers.save_npz(f, o, compression=False, **kw),
                   serializers.load_npz, '.npz'),
    'hdf5': (serializers.save_hdf5, serializers.load_hdf5, '.h5'),
}


@pytest.fixture(params=list(FORMATS))
def fmt(request):
    """(save, load, extension) of each format: NPZ deflated, NPZ stored, HDF5."""
    return FORMATS[request.param]


def as_nobody(function, *args):
    """``function(*args)`` in a fork of this process running as user nobody: its result (made
    of JSON values), or ``[exception type name, message]`` when it raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                result = function(*args)
            except Exception as error:
                result = [type(error).__name__, str(error)]
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


ADDRESS_SPACE_HEADROOM = 2 << 30  # what a test under the limit may map beyond what it had


@pytest.fixture
def address_space_limit():
    """Lowers this process's address-space limit (RLIMIT_AS) to what it maps now plus
    :data:`ADDRESS_SPACE_HEADROOM` for one test: a load that allocates on a hostile file's word
    fails that test with MemoryError, instead of taking the machine's memory and the run."""
    import resource

    with open('/proc/self/status') as status:
        mapped = next(int(line.split()[1]) * 1024 for line in status
                      if line.startswith('VmSize:'))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + ADDRESS_SPACE_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------------------------------------
# Object storage: moto's S3 server on loopback, fsspec's memory filesystem (imported only here)


CREDENTIALS = {'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_ACCESS_KEY_ID': 'testing',
               'AWS_SECRET_ACCESS_KEY': 'testing'}
_buckets = itertools.count()


@pytest.fixture(scope='session')
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port), in this process, for the session."""
    ThreadedMotoServer = pytest.importorskip('moto.server').ThreadedMotoServer  # ci/test-oldest
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # no region_name: s3fs would send a LocationConstraint
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f'http://{host}:{port}'
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Bucket:
    """A fresh bucket, its storage options, and the S3 calls made through its filesystem."""

    def __init__(self, endpoint: str):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        self.options = {'client_kwargs': {'endpoint_url': endpoint}}
        self.fs = s3fs.S3FileSystem(**self.options)  # the instance URLs with these options get
        self.name = f'bucket-{os.getpid()}-{next(_buckets)}'
        self.fs.mkdir(self.name)
        self.calls: list[tuple[str, dict]] = []
        self.fs.connect()
        self.fs.s3.meta.events.register('before-parameter-build.s3', self._record)

    def _record(self, params, model, **_):
        self.calls.append((model.name, dict(params)))

    def url(self, key: str) -> str:
        return f's3://{self.name}/{key}'

    def operations(self) -> list[str]:
        return [name for name, _ in self.calls]

    def uploaded_bytes(self) -> int:
        return sum(_length(params.get('Body')) for name, params in self.calls
                   if name in ('PutObject', 'UploadPart'))

    def ranges(self) -> list[tuple[int, int]]:
        """The byte ranges GetObject asked for (inclusive ends, as HTTP says them)."""
        found = []
        for name, params in self.calls:
            if name == 'GetObject':
                first, last = params['Range'].removeprefix('bytes=').split('-')
                found.append((int(first), int(last)))
        return found

    def keys(self) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(path.split('/', 1)[1] for path in self.fs.find(self.name))


def _length(body) -> int:
    if body is None:
        return 0
    if isinstance(body, io.BytesIO):
        return body.getbuffer().nbytes
    return len(body)


@pytest.fixture
def bucket(moto_endpoint):
    import s3fs

    yield Bucket(moto_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def memory():
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append('')
    yield fs
    fs.store.clear()
