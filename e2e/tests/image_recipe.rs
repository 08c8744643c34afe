//! The two image recipes describe the same images: `image/Containerfile` (Docker, Podman,
//! CI) builds, from scratch, exactly what `image/contents` lists, which `make image`
//! (`image/build.sh`) builds from: each listed image with its binary as entrypoint, the
//! same libraries and files, the same user, and no other image; both build the binaries
//! in release. Reads the files only; nothing is built.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail, ensure};

const CONTENTS: &str = include_str!("../../image/contents");
const CONTAINERFILE: &str = include_str!("../../image/Containerfile");
const MAKEFILE: &str = include_str!("../../Makefile");
const WORKSPACE: &str = include_str!("../../Cargo.toml");

/// The Containerfile's builder stage, which every image copies from.
const BUILDER: &str = "build";
/// Where the builder stages the libraries, files and text files of the list, each at
/// its path below this directory.
const STAGED: &str = "/rootfs";
/// Where the builder puts each stripped binary, named as its image.
const BINARIES: &str = "/out";

/// `image/contents`, parsed.
#[derive(Debug)]
struct Contents {
    /// Each image's name (its binary's) and the binary's path, its entrypoint.
    images: Vec<(String, String)>,
    /// The path of every `lib`, `file` and `text` entry: what all the images share.
    shared: BTreeSet<String>,
    /// Each `text` entry: the file's path and one of its lines.
    texts: Vec<(String, String)>,
    user: String,
}

fn contents() -> anyhow::Result<Contents> {
    let mut images = Vec::new();
    let mut shared = BTreeSet::new();
    let mut texts = Vec::new();
    let mut user = None;
    for (index, line) in CONTENTS.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("image/contents line {}: {line}", index + 1);
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["image", name, path] => images.push((name.to_string(), path.to_string())),
            ["lib" | "file", path] => {
                shared.insert(path.to_string());
            }
            ["text", path, _, ..] => {
                shared.insert(path.to_string());
                // The line as `read` leaves it: the rest after the path, spaces kept.
                let rest = line["text".len()..].trim_start()[path.len()..].trim();
                texts.push((path.to_string(), rest.to_owned()));
            }
            ["user", id] => {
                ensure!(user.is_none(), "{}: a second user", at());
                user = Some(id.to_string());
            }
            _ => bail!("{}: not an entry of the list", at()),
        }
    }
    ensure!(!images.is_empty(), "image/contents lists no image");
    for path in images.iter().map(|(_, path)| path).chain(&shared) {
        ensure!(
            path.starts_with('/'),
            "image/contents: {path} is not an absolute path"
        );
    }
    let user = user.context("image/contents names no user")?;
    Ok(Contents {
        images,
        shared,
        texts,
        user,
    })
}

/// The Containerfile's instructions, continuation lines joined and comments dropped:
/// each keyword (upper case) with the rest of its text.
fn instructions(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        // Comment and blank lines end nothing, inside a continuation too.
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (keyword, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((current.as_str(), ""));
                joined.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    ensure!(
        current.is_empty(),
        "image/Containerfile ends inside a continuation: {current}"
    );
    Ok(joined)
}

/// One stage of the Containerfile and what it changes in its image.
#[derive(Debug)]
struct Stage {
    name: String,
    /// The image or stage it starts from.
    from: String,
    /// Each file copied in: its path in the image and its source (`stage:path`).
    files: BTreeMap<String, String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    /// Every RUN command, for the build checks.
    runs: Vec<String>,
    /// Each ARG with its default.
    args: BTreeMap<String, String>,
}

fn stages() -> anyhow::Result<Vec<Stage>> {
    let mut stages: Vec<Stage> = Vec::new();
    for (keyword, rest) in instructions(CONTAINERFILE)? {
        if keyword == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let (from, name) = match words.as_slice() {
                [from] => (from.to_string(), stages.len().to_string()),
                [from, as_, name] if as_.eq_ignore_ascii_case("as") => (from.to_string(), name.to_string()),
                _ => bail!("image/Containerfile: FROM {rest}: not `FROM image [AS name]`"),
            };
            stages.push(Stage {
                name,
                from,
                files: BTreeMap::new(),
                user: None,
                entrypoint: None,
                runs: Vec::new(),
                args: BTreeMap::new(),
            });
            continue;
        }
        let Some(stage) = stages.last_mut() else {
            // Global ARGs and parser directives come before the first FROM.
            ensure!(
                keyword == "ARG",
                "image/Containerfile: {keyword} before the first FROM"
            );
            continue;
        };
        match keyword.as_str() {
            "COPY" => {
                for (destination, source) in copied(&rest)? {
                    stage.files.insert(destination, source);
                }
            }
            "ADD" => bail!("image/Containerfile: ADD {rest}: use COPY, which this check reads"),
            "USER" => stage.user = Some(rest),
            "ENTRYPOINT" => stage.entrypoint = Some(exec_form(&rest)?),
            "RUN" => stage.runs.push(rest),
            "ARG" => {
                let (name, default) = rest.split_once('=').unwrap_or((rest.as_str(), ""));
                stage
                    .args
                    .insert(name.trim().to_owned(), default.trim().to_owned());
            }
            _ => {}
        }
    }
    Ok(stages)
}

/// The files one COPY (shell form) puts in the image: each destination path and its
/// source, `stage:path` (`context:path` from the build context).
fn copied(rest: &str) -> anyhow::Result<Vec<(String, String)>> {
    ensure!(
        !rest.starts_with('['),
        "image/Containerfile: COPY {rest}: write it in shell form"
    );
    let mut from = "context".to_owned();
    let mut paths = Vec::new();
    for word in rest.split_whitespace() {
        if let Some(flag) = word.strip_prefix("--") {
            match flag.strip_prefix("from=") {
                Some(stage) => from = stage.to_owned(),
                // --chown, --chmod, --link...: they change what lands in the image.
                None => bail!("image/Containerfile: COPY {rest}: --{flag} is not checked here"),
            }
        } else {
            paths.push(word);
        }
    }
    let Some((destination, sources)) = paths.split_last() else {
        bail!("image/Containerfile: COPY {rest}: no source and destination");
    };
    ensure!(!sources.is_empty(), "image/Containerfile: COPY {rest}: no source");
    ensure!(
        sources.len() == 1 || destination.ends_with('/'),
        "image/Containerfile: COPY {rest}: several sources need a directory (`/`) destination"
    );
    let mut files = Vec::new();
    for source in sources {
        let name = source.rsplit('/').next().unwrap_or(source);
        ensure!(
            !name.is_empty() && !name.contains(['*', '?', '[']),
            "image/Containerfile: COPY {rest}: copy files one by one, not {source}, so their list shows"
        );
        let path = match destination.strip_suffix('/') {
            Some(directory) => format!("{directory}/{name}"),
            None => destination.to_string(),
        };
        files.push((path, format!("{from}:{source}")));
    }
    Ok(files)
}

/// An exec-form (JSON array of strings) ENTRYPOINT; the shell form would need a shell,
/// which the images do not have.
fn exec_form(rest: &str) -> anyhow::Result<Vec<String>> {
    let inner = rest
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .with_context(|| format!("image/Containerfile: ENTRYPOINT {rest}: not the exec form"))?;
    inner
        .split(',')
        .map(|item| {
            let item = item.trim();
            let word = item.strip_prefix('"').and_then(|i| i.strip_suffix('"'));
            match word {
                Some(word) if !word.contains(['"', '\\']) => Ok(word.to_owned()),
                _ => bail!("image/Containerfile: ENTRYPOINT {rest}: {item} is not a plain string"),
            }
        })
        .collect()
}

/// What one image holds and how it runs.
#[derive(Debug, PartialEq, Eq)]
struct Image {
    /// Each file's path in the image and where it comes from.
    files: BTreeMap<String, String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
}

/// The image the Containerfile's `target` builds, through the stages it starts from;
/// fails unless they start from scratch.
fn built(stages: &[Stage], target: &str) -> anyhow::Result<Image> {
    let mut chain = Vec::new();
    let mut name = target;
    loop {
        let stage = stages
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("image/Containerfile has no stage {name} (for {target})"))?;
        ensure!(
            chain.len() < stages.len(),
            "image/Containerfile: stage {name} starts from itself"
        );
        chain.push(stage);
        if stage.from == "scratch" {
            break;
        }
        ensure!(
            stages.iter().any(|s| s.name == stage.from),
            "image/Containerfile: {target} starts from the image {}, not from scratch",
            stage.from
        );
        name = stage.from.as_str();
    }
    let mut image = Image {
        files: BTreeMap::new(),
        user: None,
        entrypoint: None,
    };
    // A stage inherits its parent's files, user and entrypoint, and may override them.
    for stage in chain.iter().rev() {
        image.files.extend(stage.files.clone());
        if let Some(user) = &stage.user {
            image.user = Some(user.clone());
        }
        if let Some(entrypoint) = &stage.entrypoint {
            image.entrypoint = Some(entrypoint.clone());
        }
    }
    Ok(image)
}

/// The image the list describes, with the sources the Containerfile's builder gives
/// its files: the staged copies of the list's files, the stripped binary.
fn listed(contents: &Contents, name: &str, binary: &str) -> Image {
    let mut files: BTreeMap<String, String> = contents
        .shared
        .iter()
        .map(|path| (path.clone(), format!("{BUILDER}:{STAGED}{path}")))
        .collect();
    files.insert(binary.to_owned(), format!("{BUILDER}:{BINARIES}/{name}"));
    Image {
        files,
        user: Some(contents.user.clone()),
        entrypoint: Some(vec![binary.to_owned()]),
    }
}

#[test]
fn the_containerfile_builds_each_listed_image_from_scratch_with_its_files_user_and_entrypoint()
-> anyhow::Result<()> {
    let contents = contents()?;
    let stages = stages()?;
    for (name, binary) in &contents.images {
        assert_eq!(
            built(&stages, name)?,
            listed(&contents, name, binary),
            "image/Containerfile's target {name} differs from image/contents (left: the Containerfile)"
        );
    }
    Ok(())
}

#[test]
fn the_containerfile_builds_no_image_the_list_lacks() -> anyhow::Result<()> {
    let contents = contents()?;
    let stages = stages()?;
    let parents: BTreeSet<&str> = stages.iter().map(|s| s.from.as_str()).collect();
    let targets: BTreeSet<&str> = stages
        .iter()
        .map(|s| s.name.as_str())
        .filter(|name| *name != BUILDER && !parents.contains(name))
        .collect();
    let images: BTreeSet<&str> = contents.images.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        targets, images,
        "the Containerfile's final stages against image/contents' images"
    );
    Ok(())
}

/// The `:`-separated fields of each line the list writes into `file`.
fn text_fields<'a>(contents: &'a Contents, file: &str) -> Vec<Vec<&'a str>> {
    contents
        .texts
        .iter()
        .filter(|(path, _)| path == file)
        .map(|(_, line)| line.split(':').collect())
        .collect()
}

#[test]
fn the_images_run_as_a_user_of_their_passwd_and_group_files_and_never_as_root() -> anyhow::Result<()> {
    let contents = contents()?;
    let (uid, gid) = contents
        .user
        .split_once(':')
        .with_context(|| format!("image/contents: user {} is not UID:GID", contents.user))?;
    ensure!(
        uid != "0" && gid != "0",
        "image/contents: the images run as root ({})",
        contents.user
    );
    let passwd = text_fields(&contents, "/etc/passwd");
    assert!(
        passwd
            .iter()
            .any(|fields| fields.get(2) == Some(&uid) && fields.get(3) == Some(&gid)),
        "no /etc/passwd line for {uid}:{gid} in image/contents: {passwd:?}"
    );
    let group = text_fields(&contents, "/etc/group");
    assert!(
        group.iter().any(|fields| fields.get(2) == Some(&gid)),
        "no /etc/group line for {gid} in image/contents: {group:?}"
    );
    Ok(())
}

#[test]
fn both_recipes_build_every_listed_binary_in_release_and_strip_it_the_same_way() -> anyhow::Result<()> {
    let contents = contents()?;
    // `make image`: the cargo build of its recipe (tab-indented lines after `image:`).
    let recipe: Vec<&str> = MAKEFILE
        .lines()
        .skip_while(|line| !line.starts_with("image:"))
        .skip(1)
        .take_while(|line| line.starts_with('\t'))
        .collect();
    let make_build = recipe
        .iter()
        .find(|line| line.contains("cargo build"))
        .context("the Makefile's image recipe runs no cargo build")?;
    ensure!(
        recipe.iter().any(|line| line.trim() == "image/build.sh"),
        "the Makefile's image recipe does not run image/build.sh: {recipe:?}"
    );
    let builder = stages()?
        .into_iter()
        .find(|s| s.name == BUILDER)
        .context("image/Containerfile has no builder stage")?;
    ensure!(
        builder.from.ends_with("-bookworm"),
        "the builder {} is not Debian bookworm, whose paths image/contents lists",
        builder.from
    );
    let run = builder.runs.iter().find(|run| run.contains("cargo build"));
    let container_build = run.context("image/Containerfile's builder runs no cargo build")?;
    for (file, build) in [
        ("Makefile", *make_build),
        ("image/Containerfile", container_build.as_str()),
    ] {
        ensure!(
            build.contains("cargo build --release --locked"),
            "{file}: not a locked release build"
        );
        let words: Vec<&str> = build.split_whitespace().collect();
        for (name, _) in &contents.images {
            ensure!(
                words.windows(2).any(|w| w == ["-p", name.as_str()]),
                "{file}'s cargo build does not build {name}"
            );
        }
    }
    ensure!(
        include_str!("../../image/build.sh").contains("strip --strip-debug -o "),
        "image/build.sh no longer strips the binaries with --strip-debug"
    );
    for (name, _) in &contents.images {
        ensure!(
            container_build.contains(&format!("strip --strip-debug -o {BINARIES}/{name} ")),
            "image/Containerfile does not strip {name} as image/build.sh does"
        );
    }
    Ok(())
}

#[test]
fn the_containerfile_labels_the_workspace_version_by_default() -> anyhow::Result<()> {
    let version = WORKSPACE
        .lines()
        .skip_while(|line| line.trim() != "[workspace.package]")
        .find_map(|line| line.trim().strip_prefix("version = "))
        .map(|v| v.trim_matches('"'))
        .context("no version in [workspace.package] of Cargo.toml")?;
    let stages = stages()?;
    let default = stages.iter().find_map(|s| s.args.get("VERSION"));
    assert_eq!(
        default.map(String::as_str),
        Some(version),
        "image/Containerfile's ARG VERSION default"
    );
    Ok(())
}
