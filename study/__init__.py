"""The ground floor every stage stands on (torch-, timm- and Ray-free at import): the typed config, the study store, stage records, the run plan, errors, atomic writes, object storage."""
