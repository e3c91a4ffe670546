"""Model forward passes written against the array API (see ``arrayquant.apps.models.minilm``)."""
