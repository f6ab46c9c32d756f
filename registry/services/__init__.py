"""The data layer: every read and write the API, the pages and the job runners make goes through here."""
