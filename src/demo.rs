//! The built-in demo: a small binary cache made by real Nix (the fixtures' `cache/`, less
//! the busybox builder) and its evaluation, compiled into the binary. `binplz serve` with no
//! `--upstream` and no `--index` serves it, fully offline: the index is built at start-up
//! from the embedded evaluation against the embedded cache, with the same code as
//! `binplz index build`, and every file is verified against the embedded test key.

use bytes::Bytes;

use crate::upstream::{Body, BoxFuture, CachePath, Fetched, Upstream, UpstreamError};

/// The demo cache's URL, as shown in messages and the index metadata.
pub const URL: &str = "builtin:demo";

/// The key the demo cache is signed with (the fixtures' test key).
pub const PUBLIC_KEY: &str = include_str!("../fixtures/keys/binplz-test-1.public");

/// The demo's evaluation, in nix-eval-jobs form.
pub const EVAL: &[u8] = include_bytes!("../fixtures/eval/nix-eval-jobs.jsonl");

/// Every file of the demo cache, by path relative to its root.
const FILES: &[(&str, &[u8])] = &[
    (
        "35383awm6lh2kgm1l52g8f7y9kc9vp2y.ls",
        include_bytes!("../fixtures/cache/35383awm6lh2kgm1l52g8f7y9kc9vp2y.ls"),
    ),
    (
        "35383awm6lh2kgm1l52g8f7y9kc9vp2y.narinfo",
        include_bytes!("../fixtures/cache/35383awm6lh2kgm1l52g8f7y9kc9vp2y.narinfo"),
    ),
    (
        "3jzfs2gn4mqfk4pjv6q3c7f0cqq9xjmk.ls",
        include_bytes!("../fixtures/cache/3jzfs2gn4mqfk4pjv6q3c7f0cqq9xjmk.ls"),
    ),
    (
        "3jzfs2gn4mqfk4pjv6q3c7f0cqq9xjmk.narinfo",
        include_bytes!("../fixtures/cache/3jzfs2gn4mqfk4pjv6q3c7f0cqq9xjmk.narinfo"),
    ),
    (
        "fr4l0hfh1lp5pd5df98fgz2m3jczb119.ls",
        include_bytes!("../fixtures/cache/fr4l0hfh1lp5pd5df98fgz2m3jczb119.ls"),
    ),
    (
        "fr4l0hfh1lp5pd5df98fgz2m3jczb119.narinfo",
        include_bytes!("../fixtures/cache/fr4l0hfh1lp5pd5df98fgz2m3jczb119.narinfo"),
    ),
    (
        "giakv7srabf3w354msr6ia9vihf2zpaa.ls",
        include_bytes!("../fixtures/cache/giakv7srabf3w354msr6ia9vihf2zpaa.ls"),
    ),
    (
        "giakv7srabf3w354msr6ia9vihf2zpaa.narinfo",
        include_bytes!("../fixtures/cache/giakv7srabf3w354msr6ia9vihf2zpaa.narinfo"),
    ),
    (
        "jvksbhb5nrgranvingm4hm16y9lzcfbx.ls",
        include_bytes!("../fixtures/cache/jvksbhb5nrgranvingm4hm16y9lzcfbx.ls"),
    ),
    (
        "jvksbhb5nrgranvingm4hm16y9lzcfbx.narinfo",
        include_bytes!("../fixtures/cache/jvksbhb5nrgranvingm4hm16y9lzcfbx.narinfo"),
    ),
    (
        "lkmbw8hmrm4bmwgdb5bir4b0pahzw838.ls",
        include_bytes!("../fixtures/cache/lkmbw8hmrm4bmwgdb5bir4b0pahzw838.ls"),
    ),
    (
        "lkmbw8hmrm4bmwgdb5bir4b0pahzw838.narinfo",
        include_bytes!("../fixtures/cache/lkmbw8hmrm4bmwgdb5bir4b0pahzw838.narinfo"),
    ),
    (
        "nar/02byqm2rd44zf7zxa9q5h9acr6qvkw5m7hrz82gfghg8cjzlhw6y.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/02byqm2rd44zf7zxa9q5h9acr6qvkw5m7hrz82gfghg8cjzlhw6y.nar.zst"
        ),
    ),
    (
        "nar/0d04qlvhajv857vxlaazinqa276gq221npwbf9fn20yi87g0brax.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/0d04qlvhajv857vxlaazinqa276gq221npwbf9fn20yi87g0brax.nar.zst"
        ),
    ),
    (
        "nar/0ijcsjcsn4fdhh1chaf5w80kswkak67xw9kxpf817p51a676q8zm.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/0ijcsjcsn4fdhh1chaf5w80kswkak67xw9kxpf817p51a676q8zm.nar.zst"
        ),
    ),
    (
        "nar/0rzl0149v1wr90a6id74vbxky2f7976wmpidz25al5912dgzwl2k.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/0rzl0149v1wr90a6id74vbxky2f7976wmpidz25al5912dgzwl2k.nar.zst"
        ),
    ),
    (
        "nar/0zx7awc3ag758mhjyn7fakj2gdqkqmkwnczd64fgbv7q68jbdjal.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/0zx7awc3ag758mhjyn7fakj2gdqkqmkwnczd64fgbv7q68jbdjal.nar.zst"
        ),
    ),
    (
        "nar/16p5n7qkzpgv2nk0qmnaj94wbmch481wmq3ln6dzkh5m5c5nw3mj.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/16p5n7qkzpgv2nk0qmnaj94wbmch481wmq3ln6dzkh5m5c5nw3mj.nar.zst"
        ),
    ),
    (
        "nar/17f13nskd549pnx0dcrkjsyw8g566jgyriw29q6i7hmyb4126iaz.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/17f13nskd549pnx0dcrkjsyw8g566jgyriw29q6i7hmyb4126iaz.nar.zst"
        ),
    ),
    (
        "nar/1j91bjf3rk1mh9painxd932hd1m2mbpdwkzliq7frr6n4dpgmkgs.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/1j91bjf3rk1mh9painxd932hd1m2mbpdwkzliq7frr6n4dpgmkgs.nar.zst"
        ),
    ),
    (
        "nar/1n7fj0zsd7pj3xmyjagi15aarqz3fa2q2244jhl8c1ypix4r3zmz.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/1n7fj0zsd7pj3xmyjagi15aarqz3fa2q2244jhl8c1ypix4r3zmz.nar.zst"
        ),
    ),
    (
        "nar/1y2b4mllfaa8xby34k5wggavzm869hid546zn7lgc2vskvwvv6hq.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/1y2b4mllfaa8xby34k5wggavzm869hid546zn7lgc2vskvwvv6hq.nar.zst"
        ),
    ),
    (
        "nar/1yzd96jzzacjgwzvwfj1j8210vnva5blmiaffri2bcppzk41pda6.nar.zst",
        include_bytes!(
            "../fixtures/cache/nar/1yzd96jzzacjgwzvwfj1j8210vnva5blmiaffri2bcppzk41pda6.nar.zst"
        ),
    ),
    (
        "nix-cache-info",
        include_bytes!("../fixtures/cache/nix-cache-info"),
    ),
    (
        "p41bw9xj91zqbihqlyg115ir9ss8jaxw.ls",
        include_bytes!("../fixtures/cache/p41bw9xj91zqbihqlyg115ir9ss8jaxw.ls"),
    ),
    (
        "p41bw9xj91zqbihqlyg115ir9ss8jaxw.narinfo",
        include_bytes!("../fixtures/cache/p41bw9xj91zqbihqlyg115ir9ss8jaxw.narinfo"),
    ),
    (
        "rnrrk0r42zz772aga29j2b6609s7zc5i.ls",
        include_bytes!("../fixtures/cache/rnrrk0r42zz772aga29j2b6609s7zc5i.ls"),
    ),
    (
        "rnrrk0r42zz772aga29j2b6609s7zc5i.narinfo",
        include_bytes!("../fixtures/cache/rnrrk0r42zz772aga29j2b6609s7zc5i.narinfo"),
    ),
    (
        "sygc7kbsqrn9qky1d0c8vgxgwb1nlhi7.ls",
        include_bytes!("../fixtures/cache/sygc7kbsqrn9qky1d0c8vgxgwb1nlhi7.ls"),
    ),
    (
        "sygc7kbsqrn9qky1d0c8vgxgwb1nlhi7.narinfo",
        include_bytes!("../fixtures/cache/sygc7kbsqrn9qky1d0c8vgxgwb1nlhi7.narinfo"),
    ),
    (
        "ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d.ls",
        include_bytes!("../fixtures/cache/ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d.ls"),
    ),
    (
        "ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d.narinfo",
        include_bytes!("../fixtures/cache/ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d.narinfo"),
    ),
    (
        "z9y818yk8b0ybiz3b92lavnzvkra3i0m.ls",
        include_bytes!("../fixtures/cache/z9y818yk8b0ybiz3b92lavnzvkra3i0m.ls"),
    ),
    (
        "z9y818yk8b0ybiz3b92lavnzvkra3i0m.narinfo",
        include_bytes!("../fixtures/cache/z9y818yk8b0ybiz3b92lavnzvkra3i0m.narinfo"),
    ),
];

/// The embedded cache as an upstream.
#[derive(Debug, Default)]
pub struct DemoUpstream;

impl Upstream for DemoUpstream {
    fn url(&self) -> &str {
        URL
    }

    fn get<'a>(
        &'a self,
        path: &'a CachePath,
    ) -> BoxFuture<'a, Result<Option<Fetched>, UpstreamError>> {
        Box::pin(async move {
            Ok(FILES
                .iter()
                .find(|(p, _)| *p == path.path())
                .map(|(_, data)| Fetched {
                    len: Some(data.len() as u64),
                    body: Box::new(Once(Some(Bytes::from_static(data)))),
                }))
        })
    }
}

struct Once(Option<Bytes>);

impl Body for Once {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>> {
        Box::pin(async move { Ok(self.0.take()) })
    }
}
