"""Model definitions. GPT-2 is the one architecture ppojax trains today."""
