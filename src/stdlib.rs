//! The standard library: losses written in the language itself, embedded
//! from `stdlib/*.loss` and parsed once.

use std::sync::OnceLock;

use crate::diag::{FileId, SourceFile};
use crate::syntax::ast::{LossDef, SourceItem};

/// Every stdlib file, in the order of `lossc list`.
const FILES: &[(&str, &str)] = &[
    ("bce.loss", include_str!("../stdlib/bce.loss")),
    ("bce_logits.loss", include_str!("../stdlib/bce_logits.loss")),
    ("focal.loss", include_str!("../stdlib/focal.loss")),
    ("dice.loss", include_str!("../stdlib/dice.loss")),
    ("iou.loss", include_str!("../stdlib/iou.loss")),
    ("tversky.loss", include_str!("../stdlib/tversky.loss")),
    ("combo.loss", include_str!("../stdlib/combo.loss")),
    ("mcc.loss", include_str!("../stdlib/mcc.loss")),
    ("sensitivity_specificity.loss", include_str!("../stdlib/sensitivity_specificity.loss")),
    ("unified_focal.loss", include_str!("../stdlib/unified_focal.loss")),
    ("boundary.loss", include_str!("../stdlib/boundary.loss")),
    ("multiclass.loss", include_str!("../stdlib/multiclass.loss")),
    ("generalized_dice.loss", include_str!("../stdlib/generalized_dice.loss")),
    ("lovasz.loss", include_str!("../stdlib/lovasz.loss")),
    ("masked.loss", include_str!("../stdlib/masked.loss")),
];

pub struct Stdlib {
    /// Source files; file `i` has `FileId(i + 1)` (0 is the user's source).
    pub files: Vec<SourceFile>,
    pub defs: Vec<LossDef>,
}

impl Stdlib {
    pub fn get(&self, name: &str) -> Option<&LossDef> {
        self.defs.iter().find(|d| d.name.name == name)
    }
}

/// The parsed stdlib.
///
/// # Panics
/// If a stdlib file does not parse: that is a bug in lossc, caught by its tests.
pub fn stdlib() -> &'static Stdlib {
    static STDLIB: OnceLock<Stdlib> = OnceLock::new();
    STDLIB.get_or_init(|| {
        let mut files = Vec::new();
        let mut defs = Vec::new();
        for (i, (name, text)) in FILES.iter().enumerate() {
            let id = FileId(u16::try_from(i + 1).expect("invariant: few stdlib files"));
            match crate::syntax::parse(text, id) {
                Ok(SourceItem::Defs(d)) => defs.extend(d),
                Ok(SourceItem::Expr(_)) => {
                    panic!("invariant: stdlib/{name} holds loss definitions")
                }
                Err(e) => panic!("invariant: stdlib/{name} parses: {e:?}"),
            }
            files.push(SourceFile::new(format!("stdlib/{name}"), *text));
        }
        Stdlib { files, defs }
    })
}
