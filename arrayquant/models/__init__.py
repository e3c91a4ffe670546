"""Model forward passes written against the array API (see ``arrayquant.models.minilm``)."""
