"""The serving layer: one use case each (transcription, translation, chat), between HTTP and the engine.

Routes parse the wire body and make one call here; what comes back is typed (results, or deltas for a
stream) and rendered by `app/api`. Everything here is free of HTTP: no web framework is imported.
"""
