"""Small shared helpers with no model code: atomic IO, argument checks, images, dtypes, tokenizers."""
