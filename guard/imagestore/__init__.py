"""The image store: where the bytes of image links and retained images live, shared by replicas.

One small interface (`ImageStore`), content-addressed by sha256, each copy with an expiry:

    put(data, media_type, ttl_s)   store the bytes (once per content); the expiry only grows
    get(id) / has(id)              the bytes while unexpired, else None / False
    purge(before, stored_before)   delete expired copies (and, on request, older ones)
    shared_secret()                a random key every user of the store shares (link signing)
    ready() / aclose()

Kinds (registry `image_stores`, entry-point group `safeedit.image_stores`):
    local      a folder (guard.imagestore.local): one host; several processes may share it
    postgres   chunked rows in PostgreSQL (guard.imagestore.postgres): replicas share it
    s3         objects in an S3-compatible bucket (adapters.imagestore_s3, a vendor adapter that
               registers itself from `adapters` and by entry point): replicas share it

`image_store:` in the operators' config picks one; without `kind` it follows `audit:` (see
`guard.plugins.resolve_image_store`): a PostgreSQL audit store keeps images in the same database and schema, any
other in a folder (`images/` beside a SQLite database, else var/images). The audit option
`images_dir` (a folder) chooses that folder for any audit store, and cannot be combined with an
`image_store:` kind. Link options (`link_ttl_s`, `link_key_env`) sit in the same section and are read
by guard.pipeline.links.
"""

