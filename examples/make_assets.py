"""Regenerate the example inputs: examples/portrait.png and examples/speech.wav.

Both are made by the project itself (no third-party media):

* portrait.png: a simple cartoon head-and-shoulders picture drawn with PIL (512x512 RGB).
* speech.wav: 16 kHz mono speech from espeak-ng, equivalent to

      espeak-ng -v en-us -s 150 -w speech_raw.wav \
          "Hello, this is s2v fast, a speech to video demo."

  resampled to 16 kHz (espeak-ng writes 22.05 kHz), peak-normalised to -1 dBFS and padded with
  0.2 s of silence on both ends. Install it with `apt-get install -y espeak-ng`. Without espeak-ng
  the script falls back to a synthetic voiced, vowel-like signal (numpy), so it always produces a
  usable file.

Usage: python examples/make_assets.py [--out-dir examples]
"""
import argparse
import os
import shutil
import subprocess
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SENTENCE = "Hello, this is s2v fast, a speech to video demo."
SR = 16000


def make_portrait(path, size=512):
    yy = np.linspace(0, 1, size)[:, None]                                       # background gradient
    rows = np.array([70, 110, 160]) * (1 - yy) + np.array([30, 50, 90]) * yy    # [size, 3]
    px = np.broadcast_to(rows[:, None, :], (size, size, 3))
    img = Image.fromarray(px.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = size / 512
    skin, hair, shirt = (232, 190, 160), (70, 45, 30), (60, 120, 90)
    d.ellipse([96 * s, 380 * s, 416 * s, 700 * s], fill=shirt)                  # shoulders
    d.rectangle([226 * s, 320 * s, 286 * s, 400 * s], fill=(220, 175, 145))     # neck
    d.ellipse([150 * s, 70 * s, 362 * s, 260 * s], fill=hair)                   # hair (back)
    d.ellipse([166 * s, 110 * s, 346 * s, 360 * s], fill=skin)                  # face
    d.chord([160 * s, 80 * s, 352 * s, 230 * s], 180, 360, fill=hair)           # fringe
    d.ellipse([156 * s, 210 * s, 180 * s, 260 * s], fill=skin)                  # ears
    d.ellipse([332 * s, 210 * s, 356 * s, 260 * s], fill=skin)
    for cx in (215, 297):                                                        # eyes
        d.ellipse([(cx - 18) * s, 210 * s, (cx + 18) * s, 232 * s], fill=(255, 255, 255))
        d.ellipse([(cx - 8) * s, 212 * s, (cx + 8) * s, 230 * s], fill=(60, 40, 30))
        d.line([(cx - 20) * s, 195 * s, (cx + 20) * s, 190 * s], fill=hair, width=int(5 * s))
    d.line([256 * s, 235 * s, 248 * s, 275 * s, 262 * s, 278 * s], fill=(200, 150, 120), width=int(3 * s))
    d.chord([222 * s, 285 * s, 290 * s, 325 * s], 0, 180, fill=(170, 70, 70))   # mouth
    img = img.filter(ImageFilter.GaussianBlur(1.2 * s))
    img.save(path, optimize=True)


def _resample(x, sr_in, sr_out):
    if sr_in == sr_out:
        return x
    import librosa
    return librosa.resample(x, orig_sr=sr_in, target_sr=sr_out)


def _espeak(text):
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    import soundfile as sf
    with tempfile.TemporaryDirectory() as td:
        raw = os.path.join(td, "speech_raw.wav")
        subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", raw, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        x, sr = sf.read(raw, dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    return _resample(x, sr, SR)


def _synthetic(seconds=3.5):
    """Voiced vowel-like signal: glottal pulse train through 3 formant resonators, syllable envelope."""
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.cumsum(np.pi * f0 / SR)
    src = np.sign(np.sin(phase)) * 0.5 + np.sin(phase)
    out = np.zeros(n)
    for formant, bw, gain in ((700, 110, 1.0), (1220, 120, 0.6), (2600, 160, 0.3)):
        r = np.exp(-np.pi * bw / SR)
        a1, a2 = -2 * r * np.cos(2 * np.pi * formant / SR), r * r
        y = np.zeros(n)
        for i in range(2, n):
            y[i] = src[i] - a1 * y[i - 1] - a2 * y[i - 2]
        out += gain * y
    env = np.clip(np.sin(2 * np.pi * 2.2 * t), 0, None) ** 0.6
    return (out * env).astype(np.float32)


def make_speech(path):
    import soundfile as sf
    x = _espeak(SENTENCE)
    if x is None:
        print("espeak-ng not found; writing a synthetic vowel-like signal instead")
        x = _synthetic()
    x = x / (np.abs(x).max() + 1e-9) * 10 ** (-1 / 20)
    pad = np.zeros(int(0.2 * SR), np.float32)
    x = np.concatenate([pad, x.astype(np.float32), pad])
    sf.write(path, x, SR, subtype="PCM_16")
    return len(x) / SR


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    img_path = os.path.join(args.out_dir, "portrait.png")
    wav_path = os.path.join(args.out_dir, "speech.wav")
    make_portrait(img_path)
    dur = make_speech(wav_path)
    print(f"wrote {img_path} ({os.path.getsize(img_path)} bytes), "
          f"{wav_path} ({dur:.2f} s, {os.path.getsize(wav_path)} bytes)")


if __name__ == "__main__":
    main()
