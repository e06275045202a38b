"""CryoMAE: few-shot cryo-EM particle picking with a masked autoencoder.

The domain library behind the ``cryomae`` command and services: micrograph and coordinate I/O,
the MAE model, training with the self-cross similarity loss, sliding-window picking and scoring.
"""

__version__ = "0.1.0"
