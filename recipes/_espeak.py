"""eSpeak NG through its C API (ctypes), as shipped inside the ``espeakng-loader`` wheel.

The wheel carries ``libespeak-ng`` and its ``espeak-ng-data`` folder, so ``pip install`` is all
the setup there is and synthesis runs offline. The library keeps global state: one
:class:`ESpeak` per process (:func:`espeak`), synthesising synchronously into a Python callback.

A voice is ``accent+variant``: an English language file (``en-us``, ``en-gb-scotland``, ...)
and a voice variant (``m3``, ``f2``, ``klatt4``, ...) that changes formants, pitch baseline and
(klatt*) the synthesis method. The speaking rate (words per minute, 80-450) changes phoneme
durations, not the pitch: a slow word has longer vowels at the same pitch, which resampling
cannot give.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from recipes.base import UserError

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exiting the process
POS_CHARACTER = 1
CHARS_UTF8 = 1
RATE, VOLUME, PITCH, RANGE = 1, 2, 3, 4  # espeak_PARAMETER values
MIN_RATE, MAX_RATE = 80, 450  # words per minute eSpeak NG accepts without its speed-up path
MIN_PITCH, MAX_PITCH = 0, 99

SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _loader() -> object:
    try:
        import espeakng_loader
    except ImportError:
        raise UserError(
            "spoken-words needs the espeakng-loader package (pip install espeakng-loader)"
        ) from None
    return espeakng_loader


class ESpeak:
    """One initialised eSpeak NG library: :meth:`synthesize` words with a voice, rate and pitch."""

    def __init__(self) -> None:
        loader = _loader()
        self.data_path = Path(loader.get_data_path())  # type: ignore[attr-defined]
        lib = ctypes.CDLL(loader.get_library_path())  # type: ignore[attr-defined]
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        self.sample_rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise UserError(f"eSpeak NG did not initialise from {self.data_path}")
        self.version = lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        self._callback = SynthCallback(self._collect)  # kept alive: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    def _collect(self, wave: ctypes.Array, samples: int, events: int) -> int:
        if samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wave, shape=(samples,)).copy())
        return 0  # 0 = continue synthesis

    @functools.cached_property
    def variants(self) -> set[str]:
        """Names of the voice variants in the data folder (``m1``, ``f3``, ``klatt2``, ...)."""
        return {path.name for path in (self.data_path / "voices" / "!v").iterdir()}

    @functools.cached_property
    def accents(self) -> set[str]:
        """Lower-case names of the English language files (``en``, ``en-us``, ...)."""
        return {
            path.name.lower()
            for path in (self.data_path / "lang").rglob("en*")
            if path.is_file() and path.name != "en-Shaw"  # Shavian script, not an accent
        }

    def check_voice(self, voice: str) -> None:
        """UserError unless ``voice`` is ``accent+variant`` with both known to eSpeak NG."""
        accent, _, variant = voice.partition("+")
        if accent not in self.accents or variant not in self.variants:
            raise UserError(
                f"unknown voice {voice!r}: accents are {', '.join(sorted(self.accents))}; "
                "variants are the files in espeak-ng-data/voices/!v (m1-m8, f1-f5, klatt-klatt6, "
                "...)"
            )

    def synthesize(self, word: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples at :attr:`sample_rate` of ``word`` said by ``voice`` (silence kept)."""
        if not MIN_RATE <= rate <= MAX_RATE:
            raise UserError(f"speaking rate must be {MIN_RATE}-{MAX_RATE} wpm, got {rate}")
        if not MIN_PITCH <= pitch <= MAX_PITCH:
            raise UserError(f"pitch must be {MIN_PITCH}-{MAX_PITCH}, got {pitch}")
        self.check_voice(voice)
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UserError(f"eSpeak NG cannot load voice {voice!r}")
        self.lib.espeak_SetParameter(RATE, rate, 0)
        self.lib.espeak_SetParameter(PITCH, pitch, 0)
        text = word.encode() + b"\0"
        self._chunks = []
        error = self.lib.espeak_Synth(text, len(text), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        if error != 0:
            raise RuntimeError(f"espeak_Synth failed ({error}) for {word!r} with {voice!r}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


@functools.cache
def espeak() -> ESpeak:
    """The process's eSpeak NG (initialised on first use)."""
    return ESpeak()
