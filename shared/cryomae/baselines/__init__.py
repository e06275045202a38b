"""Classical pickers the benchmarks compare CryoMAE against."""

from cryomae.baselines.dog import dog_pick, dog_response

__all__ = ["dog_pick", "dog_response"]
