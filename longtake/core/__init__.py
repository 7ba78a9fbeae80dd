"""The pure core: the algorithms of a long render that are not model code and know no worker or process.

    windows.py   the window plan (plain and looped), the fusion tapers and `fuse`, per-frame initial noise
                 (independent, FreeNoise-style, correlated) and the windows' private noise, the prompt
                 timeline (`PromptKey`, `prompt_schedule`, `interpolate_embeddings`, `TextConditioning`)
    frames.py    drawn frames (a pose's skeletons, a plan's silhouettes) as palette indices, exactly (`Indexed`)

This package may import torch, numpy and the standard library only: model families (`pipelines/`), the
engine (`cluster/`) and the request import it, never the other way round. The lists of names below are the
one definition of each (torch-free, so the CLI and the request read them without importing torch).
"""

WEIGHTINGS = ("flat", "pyramid", "overlap-linear")  # the fusion tapers (windows.window_weights)
NOISE_MODES = ("independent", "freenoise", "correlated")  # initial noise (windows.frames_noise)
SCHEDULES = ("wavefront", "barrier")  # when a window runs its next step (cluster/sampler.py)
