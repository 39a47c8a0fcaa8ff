//! The canonical printed form of every stdlib loss and of its simplified
//! gradient, pinned with insta: a changed definition shows up in review.

use lossc::Loss;

#[test]
fn canonical_forms_of_the_stdlib() {
    let mut count = 0;
    for def in &lossc::stdlib::stdlib().defs {
        let Ok(loss) = Loss::compile(&def.name.name, "") else { continue };
        insta::assert_snapshot!(format!("stdlib_{}", def.name.name), loss.show_grad());
        let plan = lossc::schedule::schedule(&loss);
        insta::assert_snapshot!(format!("plan_{}", def.name.name), plan.print(&loss));
        count += 1;
    }
    assert!(count >= 25, "{count} stdlib losses");
}

#[test]
fn printing_is_deterministic() {
    for def in &lossc::stdlib::stdlib().defs {
        let Ok(a) = Loss::compile(&def.name.name, "") else { continue };
        let b = Loss::compile(&def.name.name, "").expect("compiles twice");
        assert_eq!(a.show_grad(), b.show_grad());
    }
}

#[test]
fn numerically_stable_rewrites_apply_to_user_text() {
    let show = |src: &str| Loss::compile(src, "").expect("compiles").show();
    assert!(show("mean(log(sigmoid(x)))").contains("-softplus(-x)"), "{}", show("mean(log(sigmoid(x)))"));
    assert!(show("mean(log(1 - sigmoid(x)))").contains("-softplus(x)"));
    let lsm = show("mean(y * log(softmax(x)))");
    assert!(lsm.contains("x - logsumexp(x, by = (batch, spatial))") && !lsm.contains("exp(x -"), "{lsm}");
}
