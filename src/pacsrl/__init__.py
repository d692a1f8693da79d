"""pacsrl: RLVR training of reasoning language models with PACS on top of Hugging Face TRL.

PACS (arXiv 2509.02522) turns the verifier's outcome reward into a label and trains the policy by
binary cross-entropy on an implicit reward computed from the policy's own log-probabilities, centred
within each group of sampled answers. See ``pacsrl.objective`` for the math.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
