"""Tools for the compliance officers' policy files, as pure functions the CLI and the proxy share.

    loader   read YAML with line/column marks, resolve `extends`, report every problem at once
    schema   the JSON Schema editors use, and plain words for what each field allows
    explain  a policy in plain language; the effective difference between two policies
    replay   re-decide stored traces from their recorded scores under a candidate policy
"""
