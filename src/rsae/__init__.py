"""rsae: sparse autoencoders (ReLU, JumpReLU, TopK, BatchTopK, Rational) on language-model activations."""
__version__ = "0.1.0"
