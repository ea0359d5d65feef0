"""eSpeak NG through its C API (ctypes), as shipped inside the ``espeakng-loader`` wheel.

The wheel carries ``libespeak-ng`` and its ``espeak-ng-data`` folder, so ``pip install`` is all
the setup there is and synthesis runs offline.

A voice is ``accent+variant``: an English language file (``en-us``, ``en-gb-scotland``, ...)
and a voice variant (``m3``, ``f2``, ``klatt4``, ...) that changes formants, pitch baseline and
(klatt*) the synthesis method. The speaking rate (words per minute, 80-450) changes phoneme
durations, not the pitch: a slow word has longer vowels at the same pitch, which resampling
cannot give.

Determinism: the library keeps synthesis state between calls (its pitch-flutter phase, a
harmonic-table switch) and seeds its noise from the clock, so the same word comes out slightly
differently each time. :func:`synthesize_words` therefore loads a fresh copy of the library for
every call, seeds it (``espeak_ng_SetRandSeed``) and says its words in the given order: the same
call gives the same samples, in any process, whatever was synthesised before.
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
from pathlib import Path

import numpy as np

from recipes.base import UserError

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exiting the process
POS_CHARACTER = 1
CHARS_UTF8 = 1
RATE, PITCH = 1, 3  # espeak_PARAMETER values
MIN_RATE, MAX_RATE = 80, 450  # words per minute eSpeak NG accepts without its speed-up path
MIN_PITCH, MAX_PITCH = 0, 99
RAND_SEED = 0

SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@functools.cache
def _loader() -> object:
    try:
        import espeakng_loader
    except ImportError:
        raise UserError(
            "spoken-words needs the espeakng-loader package (pip install espeakng-loader)"
        ) from None
    return espeakng_loader


def data_path() -> Path:
    """The ``espeak-ng-data`` folder inside the wheel."""
    return Path(_loader().get_data_path())  # type: ignore[attr-defined]


def version() -> str:
    """The installed espeakng-loader version (it fixes library and data: part of cache keys)."""
    from importlib.metadata import version as package_version

    return package_version("espeakng-loader")


@functools.cache
def variants() -> frozenset[str]:
    """Names of the voice variants in the data folder (``m1``, ``f3``, ``klatt2``, ...)."""
    return frozenset(path.name for path in (data_path() / "voices" / "!v").iterdir())


@functools.cache
def accents() -> frozenset[str]:
    """Lower-case names of the English language files (``en``, ``en-us``, ...)."""
    return frozenset(
        path.name.lower()
        for path in (data_path() / "lang").rglob("en*")
        if path.is_file() and path.name != "en-Shaw"  # Shavian script, not an accent
    )


def check_voice(voice: str) -> None:
    """UserError unless ``voice`` is ``accent+variant`` with both known to eSpeak NG."""
    accent, _, variant = voice.partition("+")
    if accent not in accents() or variant not in variants():
        raise UserError(
            f"unknown voice {voice!r}: accents are {', '.join(sorted(accents()))}; variants are "
            "the files in espeak-ng-data/voices/!v (m1-m8, f1-f5, klatt-klatt6, ...)"
        )


def check_rate_and_pitch(rate: int, pitch: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise UserError(f"speaking rate must be {MIN_RATE}-{MAX_RATE} wpm, got {rate}")
    if not MIN_PITCH <= pitch <= MAX_PITCH:
        raise UserError(f"pitch must be {MIN_PITCH}-{MAX_PITCH}, got {pitch}")


class _Library:
    """A freshly loaded and initialised libespeak-ng; :meth:`close` unloads it."""

    def __init__(self) -> None:
        loader = _loader()
        lib = ctypes.CDLL(loader.get_library_path())  # type: ignore[attr-defined]
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.lib = lib
        self.sample_rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data_path()).encode(), INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            self.close()
            raise UserError(f"eSpeak NG did not initialise from {data_path()}")
        lib.espeak_ng_SetRandSeed(RAND_SEED)
        self._chunks: list[np.ndarray] = []
        self._callback = SynthCallback(self._collect)  # kept alive: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wave: ctypes.Array, samples: int, events: int) -> int:
        if samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wave, shape=(samples,)).copy())
        return 0  # 0 = continue synthesis

    def say(self, word: str) -> np.ndarray:
        text = word.encode() + b"\0"
        self._chunks = []
        error = self.lib.espeak_Synth(text, len(text), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        if error != 0:
            raise RuntimeError(f"espeak_Synth failed ({error}) for {word!r}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def close(self) -> None:
        """Terminate and unload, so that the next load starts from pristine static state."""
        self.lib.espeak_Terminate()
        handle = self.lib._handle
        del self.lib
        _ctypes.dlclose(handle)


def synthesize_words(
    words: list[str], voice: str, rate: int, pitch: int
) -> tuple[list[np.ndarray], int]:
    """int16 samples of each word said by ``voice`` (silence kept), and their sample rate.

    One fresh library per call (about 50 ms), then a few ms per word: callers group the words
    of one voice, rate and pitch into one call, always in the same order.
    """
    check_rate_and_pitch(rate, pitch)
    check_voice(voice)
    library = _Library()
    try:
        if library.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UserError(f"eSpeak NG cannot load voice {voice!r}")
        library.lib.espeak_SetParameter(RATE, rate, 0)
        library.lib.espeak_SetParameter(PITCH, pitch, 0)
        return [library.say(word) for word in words], library.sample_rate
    finally:
        library.close()
