"""The model package: a Llama transformer, its checkpoint format and its tokenizer."""
from model.checkpoint import load_pretrained, save_pretrained
from model.llama import Config, Transformer
from model.tokenizer import Tokenizer

__all__ = ["load_pretrained", "save_pretrained", "Tokenizer", "Transformer", "Config"]
