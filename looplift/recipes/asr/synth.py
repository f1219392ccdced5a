"""Speech for the speech recipe, synthesized by eSpeak NG: English voices and their variants, noise, WAV files.

eSpeak NG is the C library shipped by the ``espeakng-loader`` package (GPL-3,
an optional dependency: ``pip install looplift[speech]``), driven through
``ctypes`` in its synchronous mode: ``espeak_Synth`` returns once the whole
text is spoken, each block of samples having gone to a callback on the calling
thread.

Synthesis is deterministic: the same text, voice, rate and pitch give the same
samples in every call and every process (for a given eSpeak NG version). That
takes two measures, as the library is not deterministic by itself:

- ``espeak_Initialize`` seeds the generator of the breath noise (of 11 of
  the 103 variants: ``f2``, ``f3``, ``f5``, ``whisper``, ``whisperf``, ...)
  from the clock, in seconds; it is reseeded with a constant
  (``espeak_ng_SetRandSeed``) before each synthesis.
- The synthesizer keeps state from one text to the next in static variables
  that no call resets (the phase of the pitch "flutter", of the glottal wave,
  the echo buffer), so a text sounds slightly different, and differs in length
  by a few samples, after another text, with every voice. The library is
  therefore loaded afresh for every synthesis and unloaded after it (about
  0.6 ms).

So that nothing else in the process holds it loaded (which would keep its
state), the library is loaded from a private copy in a temporary folder, next
to a private ``espeak-ng-data`` folder that links to the package's data and
holds the English voices under their language names (``voices/en-us``): eSpeak
finds a voice there by its file name, without listing every voice, which would
leak a little memory per load. The folder goes at exit; one left by a process
that was killed is removed by the next process that synthesizes.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import math
import os
import shutil
import tempfile
import threading
import wave
from pathlib import Path

import numpy as np

from looplift.errors import ConfigError, ExecutionError, InputError

__all__ = ["SAMPLE_RATE", "MIN_RATE", "MAX_RATE", "available", "Synthesizer", "active_power", "add_noise",
           "write_wav", "read_wav"]

#: the sample rate of eSpeak NG's voices (Hz)
SAMPLE_RATE = 22050
#: the speaking rates eSpeak NG accepts, in words per minute
MIN_RATE, MAX_RATE = 80, 450

_INSTALL = "speech synthesis needs eSpeak NG, from the espeakng-loader package: pip install looplift[speech]"

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3
_RAND_SEED = 0
_PREFIX = "looplift-espeak-"
_SKIPPED_VOICES = {"en-shaw"}
_SKIPPED_VARIANTS = {"fast"}

_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Voice(ctypes.Structure):
    """speak_lib.h's ``espeak_VOICE``."""

    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


def available() -> bool:
    """Whether the ``espeakng-loader`` package (with its library) is installed."""
    try:
        import espeakng_loader

        return Path(espeakng_loader.get_library_path()).is_file()
    except Exception:
        return False


def _unload(handle: int) -> None:
    import _ctypes

    if os.name == "nt":
        _ctypes.FreeLibrary(handle)
    else:
        _ctypes.dlclose(handle)


class _Engine:
    """The private copy of the library and its data folder, the English voices and the variants."""

    def __init__(self):
        try:
            import espeakng_loader

            library = Path(espeakng_loader.get_library_path())
            data = Path(espeakng_loader.get_data_path())
        except Exception as e:
            raise ConfigError(f"{_INSTALL} ({type(e).__name__}: {e})") from None
        if not library.is_file():
            raise ConfigError(f"{_INSTALL} (no library at {library})")
        _sweep()
        self.folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        atexit.register(_remove, self.folder, os.getpid())
        self.library = self.folder / library.name
        shutil.copyfile(library, self.library)
        self.home = self.folder / "espeak-ng-data"
        (self.home / "voices").mkdir(parents=True)
        for entry in data.iterdir():
            if entry.name != "voices":
                _link(entry, self.home / entry.name)
        _link(data / "voices" / "!v", self.home / "voices" / "!v")
        self.variants = tuple(sorted(f.name for f in (data / "voices" / "!v").iterdir()
                                     if f.is_file() and f.name not in _SKIPPED_VARIANTS
                                     and "+" not in f.name and len(f.name) < 36))
        with self._loaded() as lib:
            if not hasattr(lib, "espeak_ng_SetRandSeed"):
                raise ConfigError("eSpeak NG 1.52 or later is needed (for espeak_ng_SetRandSeed); this is "
                                  f"{self.version}: pip install -U espeakng-loader")
            lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
            listed = lib.espeak_ListVoices(None)
            languages, i = {}, 0
            while listed[i]:
                voice = listed[i].contents
                language = _languages(voice.languages)[0]
                if (language == "en" or language.startswith("en-")) and language not in _SKIPPED_VOICES:
                    languages[language] = voice.identifier.decode()
                i += 1
        for language, identifier in languages.items():
            (self.home / "voices" / language).write_bytes((data / "lang" / identifier).read_bytes())
        self.bases = tuple(sorted(languages))

    @contextlib.contextmanager
    def _loaded(self):
        """The library, loaded from the copy and initialized (unloaded again at the end)."""
        try:
            lib = ctypes.CDLL(str(self.library))
        except OSError as e:
            raise ConfigError(f"could not load eSpeak NG from its copy {self.library} ({e}); if the temporary "
                              "folder does not allow programs (noexec), set TMPDIR to one that does") from None
        try:
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, os.fsencode(self.folder),
                                         _INITIALIZE_DONT_EXIT)
            lib.espeak_Info.restype = ctypes.c_char_p
            self.version = lib.espeak_Info(None).decode()
            if rate != SAMPLE_RATE:
                raise ExecutionError(f"eSpeak NG {self.version} failed to start or speaks at {rate} Hz, "
                                     f"not {SAMPLE_RATE} Hz (data in {self.home})")
            try:
                yield lib
            finally:
                lib.espeak_Terminate()
        finally:
            handle = lib._handle
            del lib
            _unload(handle)

    def synthesize(self, text: bytes, voice: str, rate: int, pitch: int) -> np.ndarray:
        blocks = []

        def collect(wav, n, events):
            if wav and n > 0:
                blocks.append(ctypes.string_at(wav, 2 * n))
            return 0

        callback = _Callback(collect)
        with self._loaded() as lib:
            lib.espeak_SetSynthCallback(callback)
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ExecutionError(f"eSpeak NG {self.version} could not load the voice {voice!r}")
            lib.espeak_SetParameter(_RATE, rate, 0)
            lib.espeak_SetParameter(_PITCH, pitch, 0)
            lib.espeak_ng_SetRandSeed(ctypes.c_long(_RAND_SEED))
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            status = lib.espeak_Synth(text, len(text), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            if status != 0:
                raise ExecutionError(f"eSpeak NG {self.version} failed to speak (espeak_Synth returned {status})")
        return np.frombuffer(b"".join(blocks), dtype=np.int16).copy()


def _remove(folder: Path, pid: int) -> None:
    """Remove `folder` at exit, in the process that made it only (not in a forked child)."""
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


def _sweep() -> None:
    """Remove the folders left by processes that ended without running their exit handlers (killed, or forked
    children, which leave by ``os._exit``)."""
    if os.name != "posix":
        return
    for folder in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        pid = folder.name[len(_PREFIX):].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(source, target, target_is_directory=source.is_dir())
    except OSError:
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)


def _languages(address: int) -> list[str]:
    """An ``espeak_VOICE.languages`` list (a priority byte, then a language name, ..., then a zero byte)."""
    found = []
    while ctypes.c_ubyte.from_address(address).value:
        name = ctypes.string_at(address + 1)
        found.append(name.decode())
        address += len(name) + 2
    return found


_lock = threading.Lock()
_engine: _Engine | None = None


def _the_engine() -> _Engine:
    global _engine
    with _lock:
        if _engine is None:
            _engine = _Engine()
        return _engine


class Synthesizer:
    """English speech from text, by eSpeak NG's English voices (:meth:`voices`) at a chosen rate and pitch.

    Every instance shares the one copy of the library (eSpeak has global state); synthesis is serialized by a
    lock, so an instance may be used from several threads. Raises :class:`~looplift.errors.ConfigError` if
    ``espeakng-loader`` is not installed.
    """

    def __init__(self):
        self._engine = _the_engine()

    @property
    def version(self) -> str:
        """eSpeak NG's version (the samples of a text may change from one version to the next)."""
        return self._engine.version

    def voices(self) -> list[str]:
        """The English voices, then each with each variant: ``en-029``, ``en-gb``, ``en-gb-scotland``, ...,
        ``en-us``, ``en-us-nyc``, then ``en-029+Alex``, ..., ``en-us-nyc+zac``. A variant (from the data's
        ``voices/!v`` folder) changes the voice's pitch, formants, breath or roughness, not its accent.

        Left out: ``en-shaw`` (for text in the Shavian alphabet; it speaks Latin text as ``en-gb`` does) and the
        variant ``fast`` (a test of rates above 450 words per minute, leaving the voice unchanged below)."""
        engine = self._engine
        return list(engine.bases) + [f"{base}+{variant}" for base in engine.bases for variant in engine.variants]

    def synthesize(self, text: str, *, voice: str, rate: int = 175, pitch: int = 50) -> np.ndarray:
        """`text` spoken by `voice` (one of :meth:`voices`) at `rate` words per minute (80 to 450) and base
        `pitch` (0 to 100; 50 is the voice's own): int16 mono samples at :data:`SAMPLE_RATE`, without a pause
        after the last sentence."""
        engine = self._engine
        if not isinstance(text, str):
            raise ConfigError(f"text must be a str, not {type(text).__name__}")
        if "\0" in text:
            raise ConfigError("text must not contain NUL characters")
        base, plus, variant = voice.partition("+") if isinstance(voice, str) else ("", "", "")
        if base not in engine.bases or (plus and variant not in engine.variants):
            raise ConfigError(f"unknown voice {voice!r}: a voice is one of {', '.join(engine.bases)}, optionally "
                              f"followed by +variant, a variant being one of {', '.join(engine.variants)}")
        for name, value, low, high in (("rate", rate, MIN_RATE, MAX_RATE), ("pitch", pitch, 0, 100)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an int from {low} to {high}, not {value!r}")
        with _lock:
            return engine.synthesize(text.encode("utf-8") + b"\0", voice, rate, pitch)


def active_power(samples: np.ndarray, *, frame: int = 256, floor_db: float = 40.0) -> float:
    """The mean square of `samples` over their active part: the frames of `frame` samples (the last one may be
    shorter) whose mean square is within `floor_db` dB of the loudest frame's. 0.0 for silence."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1:
        raise ConfigError(f"samples must be one-dimensional (mono), not of shape {x.shape}")
    if x.size == 0:
        return 0.0
    starts = np.arange(0, x.size, frame)
    energy = np.add.reduceat(x * x, starts)
    counts = np.diff(np.append(starts, x.size))
    loudest = (energy / counts).max()
    if loudest == 0:
        return 0.0
    active = energy / counts >= loudest * 10 ** (-floor_db / 10)
    return float(energy[active].sum() / counts[active].sum())


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """`samples` plus white Gaussian noise, `snr_db` dB below the speech's :func:`active_power`.

    The noise covers the whole clip, silences included, and is scaled so that its mean square over the clip is
    exactly the target (so the SNR does not depend on the draw); it comes from `rng` alone. The sum is rounded
    and clipped to int16.
    """
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy.random.Generator, not {type(rng).__name__}")
    if isinstance(snr_db, bool) or not isinstance(snr_db, int | float) or not math.isfinite(snr_db):
        raise ConfigError(f"snr_db must be a finite number, not {snr_db!r}")
    x = np.asarray(samples, dtype=np.float64)
    power = active_power(x)
    if power == 0:
        raise ConfigError("add_noise needs samples that are not all silent (the SNR is relative to the speech)")
    noise = rng.standard_normal(x.size)
    noise *= math.sqrt(power * 10 ** (-snr_db / 10) / np.mean(noise * noise))
    return np.clip(np.rint(x + noise), -32768, 32767).astype(np.int16)


def write_wav(path: str | os.PathLike, samples: np.ndarray, *, rate: int = SAMPLE_RATE) -> None:
    """Write int16 mono `samples` as a 16-bit PCM WAV file at `rate` Hz."""
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.dtype != np.int16:
        raise ConfigError(f"samples must be a one-dimensional int16 array, not {samples.dtype} of shape "
                          f"{samples.shape}")
    with wave.open(os.fspath(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.astype("<i2").tobytes())


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The int16 samples and the sample rate of a 16-bit PCM mono WAV file."""
    with wave.open(os.fspath(path), "rb") as f:
        if f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise InputError(f"{os.fspath(path)} is not 16-bit mono: {f.getnchannels()} channels of "
                             f"{8 * f.getsampwidth()} bits")
        return np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.int16), f.getframerate()
